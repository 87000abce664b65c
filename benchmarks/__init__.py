"""Benchmarks that print a table and write JSON; installed as ``vesper_sdk.benchmarks``."""
