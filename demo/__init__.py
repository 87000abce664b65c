"""The Gradio chat demo, installed as ``vesper_sdk.demo``."""
