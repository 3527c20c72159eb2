"""Triton kernels and their PyTorch references (installed as ``attn_patch.kernels``).

``reference`` needs only torch; ``flash`` needs triton and is imported lazily so that the
package works on machines without it.
"""
from .reference import (attention_flops, attention_reference, block_sparse_to_dense, head_routed_reference,
                        s2_mask_reference, visibility_mask)

MAX_HEAD_DIM = 128  # largest head dim the Triton kernels take (one register tile per row)


def __getattr__(name):
    if name in ("flash", "flash_attention"):
        import importlib

        flash = importlib.import_module(f"{__name__}.flash")
        return flash if name == "flash" else flash.flash_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MAX_HEAD_DIM", "attention_reference", "s2_mask_reference", "visibility_mask", "block_sparse_to_dense", "attention_flops", "flash_attention",
           "head_routed_reference"]
