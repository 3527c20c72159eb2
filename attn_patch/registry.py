"""The method registry: each method is one module that registers a ``Method`` here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import MethodConfig
from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    """A way of computing attention.

    ``attention(config, module, query, key, value, mask, scaling, **kwargs)`` gets transformers'
    tensors (q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]) and the mask transformers built with our
    mask function, and returns ``(output [B, Tq, Hq, D], None)``. ``check_model(model, config)`` raises before anything is changed;
    ``attach``/``detach`` add and remove per-layer modules (gates, routers) on attention modules.
    """

    name: str
    summary: str
    config_class: type[MethodConfig]
    attention: Callable
    check_model: Callable | None = None
    attach: Callable | None = None
    detach: Callable | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; available methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def methods() -> dict[str, dict]:
    """Every registered method with its summary and options (name, type, default, choices, help)."""
    return {
        name: {"summary": m.summary, "options": m.config_class.describe()}
        for name, m in sorted(_METHODS.items())
    }
