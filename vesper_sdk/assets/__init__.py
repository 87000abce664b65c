"""Data shipped with the package: the demo's default model and the skills fact table."""
