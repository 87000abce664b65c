"""ONNX export and the ONNX Runtime runner, installed as ``vesper_sdk.export``."""
