"""Reading method weight files (seer gates, MoH routers, calibrations) with errors that name the file.

A damaged, truncated or mislabelled file, and tensors with NaN or inf in them, are errors at load:
loading them silently would let different backends pick different blocks or heads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import ConfigError


def as_path(path, what: str) -> Path:
    """``path`` (str or os.PathLike) as an expanded Path; anything else is a ConfigError."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a path (str or pathlib.Path), got {path!r} ({type(path).__name__})")
    return Path(os.fspath(path)).expanduser()


def read_json(path: Path, what: str, fix: str) -> dict:
    """The JSON object in ``path``; a file that is not one raises a ConfigError naming it and ``fix``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not a readable {what} ({type(err).__name__}: {err}); {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a {what} (its JSON is a {type(data).__name__}, not an object); {fix}")
    return data


def read_tensors(path: Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``, all finite; a truncated, garbage or pickle file,
    or a tensor holding NaN or inf, raises a ConfigError naming the file (and the tensor) and ``fix``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{path} is not a readable safetensors {what} ({type(err).__name__}: {err}); {fix}") \
            from None
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ConfigError(f"{path}: tensor {key!r} of this {what} holds {bad} NaN or inf value(s); {fix}")
    return tensors
