"""Tiny random-weight models of every supported family, built from configs (no downloads)."""
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 96


def build(family: str, **overrides):
    """A 2-layer model with GQA where the family has it; dropout off so outputs are deterministic."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=2)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=96, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2,
                          head_dim=16, max_position_embeddings=512, **common)
        cls = LlamaForCausalLM
    elif family == "mistral":
        cfg = MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
                            head_dim=16, sliding_window=6, max_position_embeddings=512, **common)
        cls = MistralForCausalLM
    elif family == "qwen2":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, **common)
        cls = Qwen2ForCausalLM
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=512, vocab_size=VOCAB,
                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        cls = GPT2LMHeadModel
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, rotary_pct=0.5,
                            max_position_embeddings=512, attention_dropout=0.0, hidden_dropout=0.0, **common)
        cls = GPTNeoXForCausalLM
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.pad_token_id = 0
    model = cls(cfg).eval()
    return model


FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox"]


def left_padded_batch(lengths, total, generator=None):
    """input_ids and attention_mask for sequences of the given lengths, left-padded to ``total``."""
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=generator)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, total - n:] = 1
        ids[i, : total - n] = 0
    return ids, mask


def word_tokenizer(text: str, size: int):
    """A word-level tokenizer over the most frequent words of ``text`` (id 1 is EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {}
    for w in text.lower().split():
        words[w] = words.get(w, 0) + 1
    vocab = {"<unk>": 0, "</s>": 1}
    for w, _ in sorted(words.items(), key=lambda kv: -kv[1])[: size - 2]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def load_script(path):
    """A script (a recipe) imported as a module from its file path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smollm2_gguf():
    """The embedded SmolLM2's GGUF file (the test skips where gguf or the model package is missing)."""
    import pytest

    pytest.importorskip("gguf")
    from attn_patch.models import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def smollm2_tokenizer():
    """The embedded SmolLM2's tokenizer (the test skips where gguf or the model package is missing)."""
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
