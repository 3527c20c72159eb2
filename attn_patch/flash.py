"""Method "flash": dense attention on the fused Triton kernel (the reference on CPU / float32)."""
from __future__ import annotations

from dataclasses import dataclass

from . import backend as _backend
from .config import MethodConfig, option
from .errors import ConfigError, UnsupportedModelError
from .families import head_dim
from .kernels import MAX_HEAD_DIM, attention_reference
from .masks import as_attention_mask
from .registry import Method, register_method


@dataclass
class FlashConfig(MethodConfig):
    decode: str = option(
        "auto",
        "'auto': calls with few query rows per KV head (decoding) use the split-K decode kernel; "
        "'never': always use the prefill kernel.",
        choices=("auto", "never"),
    )
    decode_splits: int | None = option(
        None, "number of KV splits for the decode kernel (None: sized from the SM count and the KV length)"
    )

    def validate(self) -> None:
        if self.decode_splits is not None and self.decode_splits < 1:
            raise ConfigError(f"decode_splits must be >= 1 or None, got {self.decode_splits}")


def check_model(model, config: FlashConfig) -> None:
    d = head_dim(model.config)
    if not 8 <= d <= MAX_HEAD_DIM:
        raise UnsupportedModelError(
            f"head_dim {d} is not supported by the fused kernel (8 <= head_dim <= {MAX_HEAD_DIM}); "
            "keep attn_implementation='sdpa' for this model"
        )


def attention(config: FlashConfig, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if dropout:
        raise ConfigError(
            f"attention dropout (p={dropout}) is not supported by attn_patch's kernels; set the config's "
            "attention dropout to 0 (attention_dropout / attn_pdrop) or put the model in eval mode"
        )
    mask = as_attention_mask(attention_mask, module, query, key, kwargs.get("is_causal"))
    if _backend.choose(config.backend, query) == "reference":
        out, _ = attention_reference(query, key, value, scale=scaling, **mask.kernel_args())
        return out.transpose(1, 2), None
    from .kernels.flash import flash_attention

    decode = False if config.decode == "never" else None
    out, _ = flash_attention(query, key, value, scale=scaling, decode=decode, num_splits=config.decode_splits,
                             **mask.kernel_args())
    return out.transpose(1, 2), None  # contiguous [B, Tq, Hq, D]; no attention weights


FLASH = register_method(Method(
    name="flash",
    summary="dense attention on attn_patch's fused Triton kernel (forward, backward, split-K decode)",
    config_class=FlashConfig,
    attention=attention,
    check_model=check_model,
))
