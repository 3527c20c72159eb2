"""attn_patch: fused and sparse attention for Hugging Face transformers models.

    import attn_patch
    attn_patch.apply(model, "flash")        # patch in place (returns the model)
    attn_patch.remove(model)                # restore exactly
    with attn_patch.patched(model, "flash"):
        ...
    attn_patch.methods()                    # methods and their options
    attn_patch.apply(model, "seer", density=0.2); attn_patch.stats(model)   # block-sparse prefill
    attn_patch.apply(model, "longlora", group=0.25)   # S2-Attn while training, dense in eval
    attn_patch.apply(model, "moh", active=0.75)       # each token uses 75% of the heads; only those run
    loss = lm_loss + attn_patch.aux_loss(model)       # MoH load-balance loss while training
"""
from . import flash as _flash  # noqa: F401  (registers the "flash" method)
from . import longlora as _longlora  # noqa: F401  (registers the "longlora" method)
from . import moh as _moh  # noqa: F401  (registers the "moh" method)
from . import seer as _seer  # noqa: F401  (registers the "seer" method)
from .config import MethodConfig
from .errors import AttnPatchError, ConfigError, PatchStateError, UnsupportedModelError
from .families import FAMILIES
from .flash import FlashConfig
from .longlora import LongLoRAConfig
from .moh import MoHConfig
from .patching import apply, patch_state, patched, remove
from .registry import methods
from .seer import SeerConfig

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "patched", "methods", "patch_state", "MethodConfig", "FlashConfig", "FAMILIES",
    "AttnPatchError", "ConfigError", "PatchStateError", "UnsupportedModelError", "load_default_model",
    "SeerConfig", "LongLoRAConfig", "MoHConfig", "stats", "aux_loss",
]


def stats(model, reset: bool = False) -> dict:
    """What a patched model's method measured (``reset=True`` starts counting afresh): for "seer", the
    achieved block density per layer and head and how many calls ran sparse or dense; for "moh", how
    often each head was picked per layer."""
    from .patching import running_state

    state = running_state(model, "stats(model)")
    if state.method == "seer":
        from .seer.method import stats as _seer_stats

        return _seer_stats(model, reset=reset)
    if state.method == "moh":
        from .moh import stats as _moh_stats

        return _moh_stats(model, reset=reset)
    raise PatchStateError(f"method {state.method!r} records no statistics (only 'seer' and 'moh' do)")


def aux_loss(model, clear: bool = True):
    """The auxiliary training loss of a patched model's method, to add to the task loss: for "moh",
    the weighted load-balance loss of the last training-mode forward."""
    from .patching import running_state

    state = running_state(model, "aux_loss(model) is the MoH load-balance loss")
    if state.method != "moh":
        raise PatchStateError(f"aux_loss(model) is the MoH load-balance loss; the model is patched with {state.method!r}")
    from .moh import aux_loss as _moh_aux

    return _moh_aux(model, clear=clear)


def load_default_model(*args, **kwargs):
    """The embedded SmolLM2-135M-Instruct and its tokenizer (see attn_patch.models)."""
    from .models import load_default_model as _load

    return _load(*args, **kwargs)
