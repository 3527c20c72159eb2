"""attn_patch: fused and sparse attention for Hugging Face transformers models.

    import attn_patch
    attn_patch.apply(model, "flash")        # patch in place (returns the model)
    attn_patch.remove(model)                # restore exactly
    with attn_patch.patched(model, "flash"):
        ...
    attn_patch.methods()                    # methods and their options
"""
from ._source_tree import mount_kernels as _mount_kernels

_mount_kernels()

from . import flash as _flash  # noqa: E402,F401  (registers the "flash" method)
from .config import MethodConfig  # noqa: E402
from .errors import AttnPatchError, ConfigError, PatchStateError, UnsupportedModelError  # noqa: E402
from .families import FAMILIES  # noqa: E402
from .flash import FlashConfig  # noqa: E402
from .patching import apply, patch_state, patched, remove  # noqa: E402
from .registry import methods  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "patched", "methods", "patch_state", "MethodConfig", "FlashConfig", "FAMILIES",
    "AttnPatchError", "ConfigError", "PatchStateError", "UnsupportedModelError", "load_default_model",
]


def load_default_model(*args, **kwargs):
    """The embedded SmolLM2-135M-Instruct and its tokenizer (see attn_patch.models)."""
    from .models import load_default_model as _load

    return _load(*args, **kwargs)
