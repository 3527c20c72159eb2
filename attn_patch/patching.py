"""apply / remove / patched: swapping a model's attention through transformers' registry.

Each apply() registers one attention function and one mask function under a name of its own
(``attn_patch_<n>``) and points the model's config at it with ``set_attn_implementation``.
The function closes over that model's method config, so two patched models in one process never
share state. remove() points the config back and deletes both registry entries. The names avoid
the substring "flash": transformers treats any implementation containing it as FlashAttention.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass

import torch

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .config import MethodConfig
from .errors import ConfigError, PatchStateError
from .families import family_of
from .masks import mask_function
from .registry import get_method

STATE_ATTR = "_attn_patch"
_names = itertools.count()


@dataclass
class PatchState:
    method: str
    config: MethodConfig
    registry_name: str
    previous_implementation: str | None


def apply(model, method: str = "flash", config: MethodConfig | None = None, **options):
    """Patch ``model``'s attention in place with ``method`` and return the model.

    Options are the fields of the method's config (see ``attn_patch.methods()``); pass them as
    keywords or as a ready ``config`` object.
    """
    if getattr(model, STATE_ATTR, None) is not None:
        current = getattr(model, STATE_ATTR).method
        raise PatchStateError(f"model is already patched with {current!r}; call attn_patch.remove(model) first")
    spec = get_method(method)
    family_of(model)
    if config is None:
        config = spec.config_class.from_options(method, options)
    elif options:
        raise ConfigError("pass either a config object or keyword options, not both")
    elif not isinstance(config, spec.config_class):
        raise ConfigError(f"method {method!r} takes a {spec.config_class.__name__}, got {type(config).__name__}")
    if spec.check_model is not None:
        spec.check_model(model, config)

    name = f"attn_patch_{next(_names)}"
    AttentionInterface.register(name, functools.partial(_autocast_call, spec.attention, config))
    AttentionMaskInterface.register(name, mask_function)
    state = PatchState(method, config, name, model.config._attn_implementation)
    try:
        if spec.attach is not None:
            spec.attach(model, config)
        model.set_attn_implementation(name)
    except BaseException:
        _unregister(name)
        if spec.detach is not None:
            spec.detach(model)
        raise
    object.__setattr__(model, STATE_ATTR, state)
    return model


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under ``torch.autocast``, floating-point attention inputs in another dtype are cast to the
    autocast dtype, as autocast does for SDPA (the model's fp32 RoPE would otherwise hand fp32
    queries and keys next to bf16 values to the kernels)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in tensors)


def _autocast_call(attention, config, module, query, key, value, *args, **kwargs):
    query, key, value = autocast_inputs(query, key, value)
    return attention(config, module, query, key, value, *args, **kwargs)


def remove(model):
    """Undo apply(): the model's attention implementation, modules and parameters are as before."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise PatchStateError("model is not patched by attn_patch (nothing to remove)")
    spec = get_method(state.method)
    model.set_attn_implementation(state.previous_implementation)
    if spec.detach is not None:
        spec.detach(model)
    _unregister(state.registry_name)
    object.__delattr__(model, STATE_ATTR)
    return model


@contextlib.contextmanager
def patched(model, method: str = "flash", config: MethodConfig | None = None, **options):
    """``with attn_patch.patched(model, "flash"):`` patch for the block, restore after it."""
    apply(model, method, config, **options)
    try:
        yield model
    finally:
        remove(model)


def patch_state(model) -> PatchState | None:
    """The method and config a model is patched with, or None."""
    return getattr(model, STATE_ATTR, None)


def _unregister(name: str) -> None:
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
