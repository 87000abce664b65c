"""Benchmarks: each module prints a table and writes JSON; installed as ``vesper_sdk.benchmarks``."""
