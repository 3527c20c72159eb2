"""Exceptions attn_patch raises; each message says what to change."""


class AttnPatchError(Exception):
    """Base class for attn_patch errors."""


class UnsupportedModelError(AttnPatchError, ValueError):
    """The model family, head size or layout is not one attn_patch can patch."""


class ConfigError(AttnPatchError, ValueError):
    """A method option has a wrong name, type or value."""


class PatchStateError(AttnPatchError, RuntimeError):
    """apply() on a patched model, remove() on an unpatched one, and similar misuse."""
