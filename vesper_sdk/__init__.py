"""vesper-sdk: train, quantize, export, serve and chat with VesperLM models.

>>> import vesper_sdk as vs
>>> cfg = vs.VesperConfig.from_preset("tiny", vocab_size=4096)
>>> model = vs.VesperLM(cfg)

The public calls (train, load, calibrate, quantize, export_onnx, serve) are listed in
``api.py``; each imports its job's dependencies on first use, so ``import vesper_sdk`` stays
fast and works without the optional extras.
"""

from __future__ import annotations

from pathlib import Path

from .api import PUBLIC, resolve
from .config import ConfigError, VesperConfig
from .hf import install_import_hook
from .model import ModelFolderError, VesperLM, VesperOutput
from .tokenizer import VesperTokenizer

__version__ = "0.1.0"

# kernels/, export/, demo/ and benchmarks/ sit at the repo's top level with no __init__.py: a
# folder without one is only a namespace portion, which any installed regular package of the same
# name beats, so with the repo root on sys.path (`python -m pytest`, `python -c` there) they never
# hide PyPI's `kernels` (which transformers imports), `export`, `demo` or `benchmarks`. A wheel
# installs them under vesper_sdk/; from a source checkout (setuptools' editable finder does not
# resolve namespaces nested in a regular package) they are found through the repo root below.
_ROOT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "kernels").is_dir() and (_ROOT / "kernels").is_dir():
    __path__.append(str(_ROOT))  # noqa: F821 (a package's own __path__)

from .export import api as _export_api  # noqa: E402 (needs __path__ above)

_export_api.install()

__all__ = ["ConfigError", "ModelFolderError", "VesperConfig", "VesperLM", "VesperOutput",
           "VesperTokenizer", "__version__", *PUBLIC]

# train, load, calibrate, quantize, export_onnx, serve, ...: resolved on first use (api.py).
__getattr__ = resolve

# transformers (optional): VesperLM joins AutoConfig / AutoModelForCausalLM when transformers'
# Auto classes are imported (at once if they already are); nothing of transformers is imported
# here, which would add seconds to `import vesper_sdk` (vesper_sdk.hf says how).
install_import_hook()
