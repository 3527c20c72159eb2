"""Typed option sets for methods. Each method's options are the fields of one dataclass."""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field

from .errors import ConfigError

BACKENDS = ("auto", "triton", "reference")


def option(default, help: str, choices: tuple | None = None):
    """A dataclass field carrying its help text (and allowed values) for ``methods()`` and the CLI."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class MethodConfig:
    """Options every method shares."""

    backend: str = option(
        "auto",
        "'triton': the fused kernels (CUDA; or CPU under TRITON_INTERPRET=1); 'reference': the plain PyTorch "
        "reference; 'auto': triton for float16/bfloat16 CUDA tensors, reference otherwise (CPU, float32).",
        choices=BACKENDS,
    )

    def __post_init__(self):
        self._normalise()
        self._check_types()
        self._check_choices()
        self.validate()

    def validate(self) -> None:
        """Method-specific value checks; raise ConfigError naming the fix."""

    @classmethod
    def from_options(cls, method: str, options: dict) -> "MethodConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
                f"valid options: {', '.join(names)} (see attn_patch.methods())"
            )
        return cls(**options)

    @classmethod
    def describe(cls) -> list[dict]:
        """One dict per option: name, type, default, choices, help."""
        hints = typing.get_type_hints(cls)
        return [
            {
                "name": f.name,
                "type": _type_name(hints[f.name]),
                "default": f.default,
                "choices": f.metadata.get("choices"),
                "help": f.metadata.get("help", ""),
            }
            for f in dataclasses.fields(cls)
        ]

    def _normalise(self) -> None:
        """numpy scalars become Python numbers, and paths (os.PathLike) strings, where the option's type
        takes them; float options must be finite."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), _allowed_types(hints[f.name])
            if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
                value = value.item()
            if isinstance(value, os.PathLike) and str in allowed:
                value = os.fspath(value)
            if isinstance(value, float) and float in allowed and not math.isfinite(value):
                raise ConfigError(f"option {f.name!r} must be a finite number, got {value!r}")
            object.__setattr__(self, f.name, value)

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = _allowed_types(hints[f.name])
            if isinstance(value, bool) and bool not in allowed:
                ok = False
            else:
                ok = isinstance(value, allowed)
            if not ok:
                raise ConfigError(
                    f"option {f.name!r} must be {_type_name(hints[f.name])}, got {value!r} ({type(value).__name__})"
                )

    def _check_choices(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"option {f.name!r} must be one of {choices}, got {value!r}")


def _allowed_types(hint) -> tuple:
    args = typing.get_args(hint) or (hint,)
    allowed = tuple(type(None) if a is type(None) else a for a in args)
    return allowed + (int,) if float in allowed and int not in allowed else allowed


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if args:
        return " | ".join("None" if a is type(None) else a.__name__ for a in args)
    return getattr(hint, "__name__", str(hint))
