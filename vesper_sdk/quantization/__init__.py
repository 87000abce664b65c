"""Weight quantization of VesperLM: one class per method, bitsandbytes LLM.int8 (``int8``),
``nf4`` and ``fp4``.

>>> import vesper_sdk as vs
>>> vs.quantize("runs/a/model", method="nf4", out_dir="runs/a-nf4")  # a new model folder
>>> lm = vs.load("runs/a-nf4")                                  # rebuilt, ready to generate

- ``methods.py``: the ``QuantMethod`` protocol (how a method replaces a linear layer's
  base product and saves/loads its tensors) and the registry ``METHODS``.
- ``bnb.py``: the bitsandbytes methods and ``QuantizedFlyLoRALinear``, a FlyLoRA layer
  whose base product is quantized while its branch stays in full precision.
- ``api.py``: ``quantize`` / ``load_quantized`` (the folder) and ``vesper quantize``.

What is quantized, and why the rest is not:

- every linear map inside the decoder blocks: attention ``qkv`` and ``o_proj``, the FFN
  ``down`` projection and the *base* weight of the FlyLoRA ``gate``/``up`` layers (MoE
  experts included). These hold nearly all of the weights of a block.
- FlyLoRA keeps its branch in full precision: ``A`` is the frozen sparse +-1/sqrt(nnz)
  matrix whose |Ax| picks the top-k ranks, so rounding it would change *which* experts
  fire, not just by how much; ``B`` is small (out x rank).
- full precision too: the embedding (it is also the tied LM head, where rounding moves
  every logit), the norms, the MetaHead (its confidence is calibrated on fp logits) and
  the MoE router (a routing flip costs more than the bytes saved).

A quantized folder is an ordinary model folder: ``config.json`` with a ``quantization``
block, ``model.safetensors`` holding the bitsandbytes state (int8 weights + row scales
``SCB``; packed 4-bit weights + their quant-state tensors; no pickle) and the
``tokenizer.json``. ``load_quantized`` rebuilds the layers from those tensors;
``vesper_sdk.load`` calls it when it sees the block, so generate/stream/chat need no
change. ``vesper quantize --report MODEL_DIR`` runs ``vesper_sdk.benchmarks.quantized``.
"""

from .api import QuantizeOptions, cli, load_quantized, quantize, quantize_model
from .bnb import QuantizedFlyLoRALinear
from .methods import METHODS, QuantizeError, QuantMethod, check_method

__all__ = ["METHODS", "QuantMethod", "QuantizeError", "QuantizeOptions",
           "QuantizedFlyLoRALinear", "check_method", "cli", "load_quantized", "quantize",
           "quantize_model"]
