"""Triton kernels of vesper-sdk, each beside its plain-torch reference.

Installed as ``vesper_sdk.kernels``. Importing this package does not import triton;
each kernel module does, so CPU-only users never need it.
"""
