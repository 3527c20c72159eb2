"""Which implementation runs a call: the Triton kernels or the PyTorch reference."""
from __future__ import annotations

import logging
import os

import torch

from .errors import ConfigError

logger = logging.getLogger("attn_patch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # what 'auto' sends to the kernels
EXACT_DTYPES = (torch.float32,)  # the kernels run these with IEEE dots when asked explicitly
_said = set()


def _once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.warning(message)


def choose(backend: str, query: torch.Tensor) -> str:
    """'triton' or 'reference' for this call, or a ConfigError naming the fix."""
    on_gpu = query.device.type == "cuda"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if query.dtype not in KERNEL_DTYPES + EXACT_DTYPES:
            raise ConfigError(f"backend='triton' needs float16, bfloat16 or float32 activations, got {query.dtype}; "
                              "cast the model (model.to(torch.bfloat16)) or use backend='reference'")
        if not on_gpu and not interpret:
            raise ConfigError(f"backend='triton' needs a CUDA device (tensors are on {query.device}); move the "
                              "model to CUDA, set TRITON_INTERPRET=1 to interpret the kernels on CPU, "
                              "or use backend='auto'")
        return "triton"
    # auto
    if on_gpu and query.dtype in KERNEL_DTYPES:
        return "triton"
    if on_gpu:
        _once(f"attn_patch: {query.dtype} activations run through the PyTorch reference (exact, slower); "
              "cast the model to bfloat16 or float16 for the fused kernels")
    return "reference"


def check_backend(model, backend: str) -> None:
    """At apply(): what the model already tells against an explicit backend='triton' (no CUDA and no
    interpreter, or weights in a dtype the kernels do not take)."""
    if backend != "triton":
        return
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ConfigError("backend='triton' needs a CUDA device and this machine has none (torch.cuda.is_available() "
                          "is False); use backend='auto' or 'reference', or set TRITON_INTERPRET=1 to interpret the "
                          "kernels on CPU (slow)")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    bad = sorted(str(d) for d in dtypes if d not in KERNEL_DTYPES + EXACT_DTYPES)
    if bad:
        raise ConfigError(f"backend='triton' takes float16, bfloat16 or float32 activations and the model's weights "
                          f"are {', '.join(bad)}; cast the model (model.to(torch.bfloat16)) or use backend='reference'")
