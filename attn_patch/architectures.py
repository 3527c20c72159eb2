"""Named model architectures with random weights: the shapes users run, for speed and memory only.

``--model arch:llama-3.1-8b`` (anywhere a model is taken: ``bench e2e``, the train-step benchmark,
the recipes, the evaluations) builds the model from its published config, in the requested dtype,
directly on the device, with seeded random weights. Nothing is downloaded, and nothing measured on
such a model says anything about quality: every table and result row names the architecture and
says "random weights".

``arch:NAME:tiny`` is the same family with the same attention layout (query heads, KV heads,
RoPE, sliding window, biases) at 2 layers and head dim 16, for CPU tests of the benchmark paths.

The model comes with a byte-level tokenizer (one id per byte of UTF-8 text, ids 0-255, then EOS),
enough to turn any text into token ids; the architectures' real tokenizers are not needed for speed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ConfigError

PREFIX = "arch:"
TINY = "tiny"
BYTE_EOS = 256  # the byte tokenizer's EOS (and padding) id


@dataclass(frozen=True)
class Architecture:
    name: str
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    positions: int
    head_dim: int | None = None  # None: hidden // heads
    extra: dict = field(default_factory=dict)  # other config fields (RoPE, biases, tying)

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def describe(self) -> str:
        return (f"{self.name}: {self.model_type}, {self.layers} layers, hidden {self.hidden}, {self.heads} query / "
                f"{self.kv_heads} KV heads of {self.dim}, vocab {self.vocab}, {self.positions} positions")


_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Shapes from the models' published config.json files (hidden sizes, heads, vocabularies, RoPE).
ARCHITECTURES = {a.name: a for a in (
    Architecture("llama-3.1-8b", "llama", 32, 4096, 14336, 32, 8, 128256, 131072,
                 extra={"rope_parameters": {"rope_theta": 500000.0, "factor": 8.0, **_LLAMA3_ROPE},
                        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}),
    Architecture("llama-3.2-1b", "llama", 16, 2048, 8192, 32, 8, 128256, 131072, head_dim=64,
                 extra={"rope_parameters": {"rope_theta": 500000.0, "factor": 32.0, **_LLAMA3_ROPE},
                        "rms_norm_eps": 1e-5, "tie_word_embeddings": True}),
    Architecture("qwen2.5-7b", "qwen2", 28, 3584, 18944, 28, 4, 152064, 32768,
                 extra={"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "rms_norm_eps": 1e-6,
                        "tie_word_embeddings": False, "use_sliding_window": False, "max_window_layers": 28}),
    Architecture("mistral-7b", "mistral", 32, 4096, 14336, 32, 8, 32768, 32768, head_dim=128,
                 extra={"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "rms_norm_eps": 1e-5,
                        "tie_word_embeddings": False, "sliding_window": None}),
)}


def is_arch(model) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def parse(spec: str) -> tuple[Architecture, bool]:
    """``arch:NAME`` or ``arch:NAME:tiny`` -> (architecture, tiny); a ConfigError lists the names."""
    name, _, scale = spec.removeprefix(PREFIX).partition(":")
    if name not in ARCHITECTURES or scale not in ("", TINY):
        raise ConfigError(f"model {spec!r}: the named architectures are "
                          f"{', '.join(PREFIX + n for n in ARCHITECTURES)} (append ':tiny' for the 2-layer test "
                          "size)")
    return ARCHITECTURES[name], scale == TINY


def label(spec: str) -> str:
    """How results name the model: ``arch:llama-3.1-8b`` (``arch:llama-3.1-8b:tiny``)."""
    arch, tiny = parse(spec)
    return PREFIX + arch.name + (":" + TINY if tiny else "")


def build_config(spec: str):
    """The transformers config of ``arch:NAME[:tiny]``."""
    from transformers import AutoConfig

    arch, tiny = parse(spec)
    dims = dict(num_hidden_layers=arch.layers, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
                head_dim=arch.dim, vocab_size=arch.vocab)
    if tiny:
        dim = 16
        dims = dict(num_hidden_layers=2, hidden_size=arch.heads * dim, intermediate_size=2 * arch.heads * dim,
                    head_dim=dim, vocab_size=BYTE_EOS + 8)
    config = AutoConfig.for_model(arch.model_type, num_attention_heads=arch.heads,
                                  num_key_value_heads=arch.kv_heads, max_position_embeddings=arch.positions,
                                  bos_token_id=BYTE_EOS, eos_token_id=BYTE_EOS, pad_token_id=BYTE_EOS,
                                  **dims, **arch.extra)
    if tiny and arch.extra.get("max_window_layers"):
        config.max_window_layers = dims["num_hidden_layers"]
    config._name_or_path = label(spec)
    return config


def byte_tokenizer():
    """A byte-level tokenizer: each UTF-8 byte of the text is one id (0-255); EOS and padding are 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|eos|>"] = BYTE_EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>",
                                   model_max_length=10**9)


def _byte_of(ch: str) -> int:
    """The byte GPT-2's byte-to-unicode table maps to ``ch`` (printable bytes map to themselves)."""
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def build_model(spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                seed: int = 0, rope_scaling: dict | None = None):
    """(model, tokenizer) for ``arch:NAME[:tiny]``: random weights (seeded), built on ``device`` in
    ``dtype``, SDPA attention, eval mode; ``rope_scaling`` as for :func:`attn_patch.models.with_rope_scaling`."""
    from transformers import AutoModelForCausalLM

    from .models import with_rope_scaling

    config = build_config(spec)
    if rope_scaling:
        config = with_rope_scaling(config, rope_scaling)
    config._attn_implementation = "sdpa"
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG is untouched
        torch.manual_seed(seed)
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.pad_token_id = BYTE_EOS
    return model.eval(), byte_tokenizer()
