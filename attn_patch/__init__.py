"""attn_patch: fused and sparse attention for Hugging Face transformers models.

    import attn_patch
    attn_patch.apply(model, "flash")        # patch in place (returns the model)
    attn_patch.remove(model)                # restore exactly
    with attn_patch.patched(model, "flash"):
        ...
    attn_patch.methods()                    # methods and their options
    attn_patch.apply(model, "seer", density=0.2); attn_patch.stats(model)   # block-sparse prefill
    attn_patch.apply(model, "longlora", group=0.25)   # S2-Attn while training, dense in eval
"""
from ._source_tree import mount_kernels as _mount_kernels

_mount_kernels()

from . import flash as _flash  # noqa: E402,F401  (registers the "flash" method)
from . import longlora as _longlora  # noqa: E402,F401  (registers the "longlora" method)
from . import seer as _seer  # noqa: E402,F401  (registers the "seer" method)
from .config import MethodConfig  # noqa: E402
from .errors import AttnPatchError, ConfigError, PatchStateError, UnsupportedModelError  # noqa: E402
from .families import FAMILIES  # noqa: E402
from .flash import FlashConfig  # noqa: E402
from .longlora import LongLoRAConfig  # noqa: E402
from .patching import apply, patch_state, patched, remove  # noqa: E402
from .registry import methods  # noqa: E402
from .seer import SeerConfig  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "patched", "methods", "patch_state", "MethodConfig", "FlashConfig", "FAMILIES",
    "AttnPatchError", "ConfigError", "PatchStateError", "UnsupportedModelError", "load_default_model",
    "SeerConfig", "LongLoRAConfig", "stats",
]


def stats(model, reset: bool = False) -> dict:
    """What a patched model's method measured: for "seer", the achieved block density per layer and
    head and how many calls ran sparse or dense (``reset=True`` starts counting afresh)."""
    from .patching import patch_state as _state

    state = _state(model)
    if state is None:
        raise PatchStateError("model is not patched by attn_patch; call attn_patch.apply(model, ...) first")
    if state.method == "seer":
        from .seer.method import stats as _seer_stats

        return _seer_stats(model, reset=reset)
    raise PatchStateError(f"method {state.method!r} records no statistics (only 'seer' does)")


def load_default_model(*args, **kwargs):
    """The embedded SmolLM2-135M-Instruct and its tokenizer (see attn_patch.models)."""
    from .models import load_default_model as _load

    return _load(*args, **kwargs)
