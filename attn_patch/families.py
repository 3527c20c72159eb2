"""Model families attn_patch can patch, keyed by ``config.model_type``.

Every family listed here routes attention through transformers' attention registry and builds its
masks with ``masking_utils``, so one registered attention function and one mask function cover it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    model_type: str
    attention_class: str  # the modeling class whose forward calls the registered function
    sliding_window: bool  # whether the family can use a sliding window


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaAttention", False),
        Family("mistral", "MistralAttention", True),
        Family("qwen2", "Qwen2Attention", True),
        Family("gpt2", "GPT2Attention", False),
        Family("gpt_neox", "GPTNeoXAttention", False),
    )
}

# families users ask about that do not go through the attention registry
_NOT_ROUTED = {
    "gptj": "GPT-J computes attention inside its own module",
    "falcon": "Falcon's attention is not routed through transformers' attention registry",
    "bloom": "BLOOM adds ALiBi biases inside its own attention code",
    "mpt": "MPT adds ALiBi biases inside its own attention code",
}


def family_of(model) -> Family:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no config.model_type; attn_patch patches Hugging Face transformers "
            "models (PreTrainedModel instances)"
        )
    if model_type not in FAMILIES:
        why = _NOT_ROUTED.get(model_type, "it is not in attn_patch's family table")
        raise UnsupportedModelError(
            f"model family {model_type!r} is not supported ({why}); supported families: "
            f"{', '.join(sorted(FAMILIES))}. Keep attn_implementation='sdpa' for this model."
        )
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"{model_type} with cross-attention is not supported; attn_patch patches decoder-only models"
        )
    return FAMILIES[model_type]


def head_dim(config) -> int:
    explicit = getattr(config, "head_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    return hidden // heads


def attention_modules(model) -> list:
    """The attention modules of a supported model, in layer order."""
    family = family_of(model)
    return [m for m in model.modules() if type(m).__name__ == family.attention_class]
