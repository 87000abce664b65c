"""``python -m vesper_sdk.training DATA --out-dir ...``, also under ``torchrun``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
