"""The embedded SmolLM2-135M-Instruct (real weights, real attention patterns): patched greedy generation
equals the original model on a prompt of a few hundred tokens."""
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, has_triton

import attn_patch

BOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "books" / "pride_and_prejudice.txt"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    try:
        from attn_patch.models import default_gguf_path

        default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return attn_patch.load_default_model(device=DEVICE)


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tokenizer = smollm2
    if BOOK.is_file():
        text = BOOK.read_text(encoding="utf-8")[20_000:24_000]
    else:
        from attn_patch.cli import BUILTIN_TEXT

        text = BUILTIN_TEXT * 6
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :320]
    assert ids.shape[1] >= 300
    return ids.to(DEVICE)


def test_loads_the_embedded_model(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        ("llama", 30, 9, 3)
    assert tokenizer.decode(tokenizer("hello world").input_ids).strip().endswith("hello world")


@pytest.mark.parametrize("backend", ["reference",
                                     pytest.param("triton", marks=pytest.mark.skipif(not has_triton(),
                                                                                     reason="no triton"))])
def test_patched_generation_equals_original(smollm2, prompt, backend):
    model, tokenizer = smollm2
    new_tokens = 12
    if backend == "triton" and DEVICE == "cpu":
        # the interpreted kernels take ~1 s per layer at 320 tokens: a shorter prompt on CPU, the full one on GPU
        prompt, new_tokens = prompt[:, :64], 6
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected_logits = model(prompt).logits[0, -1]
        expected = model.generate(prompt, **gen)
        with attn_patch.patched(model, "flash", backend=backend):
            logits = model(prompt).logits[0, -1]
            got = model.generate(prompt, **gen)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-3)
    assert torch.equal(got, expected), tokenizer.decode(got[0, prompt.shape[1]:])
