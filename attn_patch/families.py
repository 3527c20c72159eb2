"""Model families attn_patch can patch, keyed by ``config.model_type``.

Every family listed here routes attention through transformers' attention registry and builds its
masks with ``masking_utils``, so one registered attention function and one mask function cover it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    model_type: str
    attention_class: str  # the modeling class whose forward calls the registered function
    sliding_window: bool  # whether the family can use a sliding window
    out_proj: str  # the attention module's output projection (its input is the heads side by side)


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaAttention", False, "o_proj"),
        Family("mistral", "MistralAttention", True, "o_proj"),
        Family("qwen2", "Qwen2Attention", True, "o_proj"),
        Family("gpt2", "GPT2Attention", False, "c_proj"),
        Family("gpt_neox", "GPTNeoXAttention", False, "dense"),
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




def output_projection(module) -> torch.nn.Module:
    """The output projection of one of a supported family's attention modules."""
    family = next((f for f in FAMILIES.values() if f.attention_class == type(module).__name__), None)
    if family is None:
        raise UnsupportedModelError(f"{type(module).__name__} is not an attention module attn_patch knows")
    return getattr(module, family.out_proj)


def head_output_maps(module, num_heads: int) -> torch.Tensor:
    """[H, D, out]: what each head's output goes through in the attention module's output projection
    (an nn.Linear, or GPT-2's transposed Conv1D), so head h adds ``o_h @ maps[h]`` to the residual."""
    proj = output_projection(module)
    w = proj.weight
    if isinstance(proj, torch.nn.Linear):  # [out, H * D]
        return w.view(w.shape[0], num_heads, -1).permute(1, 2, 0)
    return w.view(num_heads, -1, w.shape[1])  # GPT-2's Conv1D: [H * D, out]
