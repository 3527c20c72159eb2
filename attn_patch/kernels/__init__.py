"""Triton kernels and their PyTorch references, imported as ``attn_patch.kernels``.

The kernel modules live in the repository's top-level ``kernels/`` folder, which on purpose has no
``__init__.py``: with one, ``import kernels`` run from the repository root would find that folder
instead of Hugging Face's ``kernels`` library, which transformers imports. A wheel installs the
modules beside this file; in a checkout (editable install, or ``PYTHONPATH=.``) the folder is added
to this package's search path.

``reference`` needs only torch; ``flash`` needs triton and is imported lazily so that the
package works on machines without it.
"""
import os as _os

if not _os.path.isfile(_os.path.join(_os.path.dirname(__file__), "reference.py")):
    _source = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))),
                            "kernels")
    if _os.path.isfile(_os.path.join(_source, "reference.py")):
        __path__.append(_source)

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
