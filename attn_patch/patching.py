"""apply / remove / patched: swapping a model's attention through transformers' registry.

One attention function and one mask function are registered with transformers, once, under the name
``attn_patch``. ``apply()`` gives the model a private copy of its config (so a teacher built from the
same config object is never touched), points that copy at ``attn_patch`` with
``set_attn_implementation``, and puts the method's state on each attention module; the registered
function reads it from the module it is called with. So patch state travels with the modules: into a
``copy.deepcopy`` or pickle of the model (which is then independent), into a PEFT wrapper and out of
``merge_and_unload()``. ``remove()`` puts the original config objects back and detaches the method's
modules. The registered name avoids the substring "flash": transformers treats any implementation
containing it as FlashAttention.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface

from .backend import check_backend
from .config import MethodConfig
from .errors import ConfigError, PatchStateError
from .families import attention_modules, family_of
from .masks import mask_function
from .registry import get_method

logger = logging.getLogger("attn_patch")

IMPLEMENTATION = "attn_patch"  # the name registered with transformers
STATE_ATTR = "_attn_patch"  # the PatchState on every patched attention module


@dataclass(eq=False)
class PatchState:
    """What one apply() did: the method and its config, and what remove() must put back."""

    method: str
    config: MethodConfig
    # (module, its config before apply) for every module whose ``config`` was the model's config
    original_configs: list = field(default_factory=list, repr=False)
    # (PreTrainedModel, its instance _keys_to_ignore_on_save before apply, None where it had none)
    save_ignores: list = field(default_factory=list, repr=False)


def _attention(module, query, key, value, *args, **kwargs):
    state = getattr(module, STATE_ATTR, None)
    if state is None:
        raise PatchStateError(
            f"{type(module).__name__} runs attention implementation {IMPLEMENTATION!r} but carries no attn_patch "
            "state; patch the model with attn_patch.apply(model, method) instead of setting the implementation by "
            "name")
    query, key, value = autocast_inputs(query, key, value)
    return get_method(state.method).attention(state.config, module, query, key, value, *args, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, mask_function)


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under ``torch.autocast``, floating-point attention inputs in another dtype are cast to the
    autocast dtype, as autocast does for SDPA (the model's fp32 RoPE would otherwise hand fp32
    queries and keys next to bf16 values to the kernels)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in tensors)


def apply(model, method: str = "flash", config: MethodConfig | None = None, **options):
    """Patch ``model``'s attention in place with ``method`` and return the model.

    Options are the fields of the method's config (see ``attn_patch.methods()``); pass them as
    keywords or as a ready ``config`` object.
    """
    _refuse_patched(model)
    spec = get_method(method)
    family_of(model)
    if config is None:
        config = spec.config_class.from_options(method, options)
    elif options:
        raise ConfigError("pass either a config object or keyword options, not both")
    elif not isinstance(config, spec.config_class):
        raise ConfigError(f"method {method!r} takes a {spec.config_class.__name__}, got {type(config).__name__}")
    check_backend(model, config.backend)
    if spec.check_model is not None:
        spec.check_model(model, config)

    state = PatchState(method, config)
    keys_before = set(model.state_dict().keys())
    try:
        if spec.attach is not None:
            spec.attach(model, config)
        _ignore_on_save(model, state, set(model.state_dict().keys()) - keys_before)
        _own_config(model, state)
        model.set_attn_implementation(IMPLEMENTATION)
        for module in attention_modules(model):
            object.__setattr__(module, STATE_ATTR, state)
    except BaseException:
        _undo(model, state)
        raise
    return model


def remove(model):
    """Undo apply(): the model's config objects, attention modules and parameters are as before."""
    state = _state_of(model)
    if state is None:
        raise PatchStateError("model is not patched by attn_patch (nothing to remove)")
    _undo(model, state)
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
    """The method and config ``model`` runs with, or None where its attention does not run attn_patch
    (never patched, removed, or switched to another implementation with set_attn_implementation;
    remove() still detaches what apply() attached in that last case)."""
    state = _state_of(model)
    if state is None:
        return None
    return state if set(_implementations(model)) == {IMPLEMENTATION} else None


def running_state(model, what: str) -> PatchState:
    """patch_state(model), or a PatchStateError saying why ``what`` cannot be had."""
    state = patch_state(model)
    if state is not None:
        return state
    stale = _state_of(model)
    if stale is not None:
        running = sorted(set(map(str, _implementations(model))))
        raise PatchStateError(
            f"{what}: the model was patched with {stale.method!r}, but its attention implementation was switched to "
            f"{', '.join(running)} afterwards; call attn_patch.remove(model) and apply again")
    raise PatchStateError(f"{what}: the model is not patched by attn_patch; call attn_patch.apply(model, ...) first")


def _patched_modules(model) -> list:
    return [m for m in model.modules() if STATE_ATTR in m.__dict__]


def _implementations(model) -> list:
    """The attention implementation each patched module's config names."""
    return [getattr(getattr(m, "config", None), "_attn_implementation", None) for m in _patched_modules(model)]


def _state_of(model) -> PatchState | None:
    """The one PatchState on ``model``'s modules (None if none); several is an error."""
    states = []
    for m in _patched_modules(model):
        state = m.__dict__[STATE_ATTR]
        if not any(state is s for s in states):
            states.append(state)
    if len(states) > 1:
        raise PatchStateError(f"model holds {len(states)} attn_patch patches on different submodules "
                              f"({', '.join(s.method for s in states)}); remove each from the submodule it was "
                              "applied to")
    return states[0] if states else None


def _refuse_patched(model) -> None:
    for name, module in model.named_modules():
        state = module.__dict__.get(STATE_ATTR)
        if state is not None:
            where = f" (at its submodule {name!r})" if name else ""
            raise PatchStateError(f"model is already patched with {state.method!r}{where}; call "
                                  "attn_patch.remove(model) first")


def _own_config(model, state: PatchState) -> None:
    """Give ``model`` private copies of its config objects, so that set_attn_implementation changes
    nothing another model (a teacher built from the same config, say) reads."""
    memo: dict = {}
    copy.deepcopy(model.config, memo)
    for module in model.modules():
        current = module.__dict__.get("config")
        replacement = memo.get(id(current)) if current is not None else None
        if isinstance(replacement, PretrainedConfig):
            state.original_configs.append((module, current))
            object.__setattr__(module, "config", replacement)


def _ignore_on_save(model, state: PatchState, keys: set[str]) -> None:
    """save_pretrained writes the base model only: the method's own tensors (gates, routers) are left
    out through each PreTrainedModel's instance ``_keys_to_ignore_on_save`` (saved by the method's
    own save function instead)."""
    if not keys:
        return
    from transformers import PreTrainedModel

    for prefix, module in model.named_modules():
        if not isinstance(module, PreTrainedModel):
            continue
        lead = f"{prefix}." if prefix else ""
        own = {k[len(lead):] for k in keys if k.startswith(lead)}
        if not own:
            continue
        before = module.__dict__.get("_keys_to_ignore_on_save")
        state.save_ignores.append((module, before))
        inherited = module._keys_to_ignore_on_save or ()
        object.__setattr__(module, "_keys_to_ignore_on_save", set(inherited) | own)


def _undo(model, state: PatchState) -> None:
    for module in _patched_modules(model):
        if module.__dict__[STATE_ATTR] is state:
            object.__delattr__(module, STATE_ATTR)
    for module, before in reversed(state.save_ignores):
        if before is None:
            module.__dict__.pop("_keys_to_ignore_on_save", None)
        else:
            object.__setattr__(module, "_keys_to_ignore_on_save", before)
    _warn_dropped_edits(state.original_configs)
    for module, original in reversed(state.original_configs):
        object.__setattr__(module, "config", original)
    state.save_ignores.clear()
    state.original_configs.clear()
    spec = get_method(state.method)
    if spec.detach is not None:
        spec.detach(model)


def _warn_dropped_edits(original_configs: list) -> None:
    """remove() gives the model its original config objects back; say which fields were changed on the
    private copy meanwhile (set on the model while it was patched), since those edits go with it."""
    seen = set()
    for module, original in original_configs:
        private = module.__dict__.get("config")
        if private is None or id(private) in seen:
            continue
        seen.add(id(private))
        before, after = original.to_dict(), private.to_dict()
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            logger.warning("attn_patch.remove(): the model's config is its original object again; fields set "
                           "while it was patched are not carried over: %s", ", ".join(changed))
