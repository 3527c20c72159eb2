"""Named architectures with random weights: their configs are the published shapes, the tiny
versions keep each family's attention layout, building is seeded and leaves the caller's RNG alone,
and every benchmark that takes a model or a shape takes them, end to end on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attn_patch import architectures as A
from attn_patch.benchmarking import attention_shape, read_rows
from attn_patch.errors import ConfigError
from attn_patch.evals import bench_e2e
from attn_patch.evals.bench_kernels import shape_of
from attn_patch.evals.common import load_model, model_name

ROOT = Path(__file__).resolve().parent.parent
BOOKS = ROOT.parent / "shared" / "data" / "books"

# (model_type, layers, hidden, q heads, kv heads, head dim, vocab, positions) as published
PUBLISHED = {
    "llama-3.1-8b": ("llama", 32, 4096, 32, 8, 128, 128256, 131072),
    "llama-3.2-1b": ("llama", 16, 2048, 32, 8, 64, 128256, 131072),
    "qwen2.5-7b": ("qwen2", 28, 3584, 28, 4, 128, 152064, 32768),
    "mistral-7b": ("mistral", 32, 4096, 32, 8, 128, 32768, 32768),
}


def test_every_named_architecture_is_checked_here():
    assert set(A.ARCHITECTURES) == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_config_is_the_published_shape(name):
    cfg = A.build_config(f"arch:{name}")
    model_type, layers, hidden, hq, hkv, d, vocab, positions = PUBLISHED[name]
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size, cfg.max_position_embeddings) == PUBLISHED[name]
    assert cfg.name_or_path == f"arch:{name}"
    assert getattr(cfg, "sliding_window", None) is None  # full attention in every layer, as released


def test_llama3_rope_and_tying_as_released():
    big, small = A.build_config("arch:llama-3.1-8b"), A.build_config("arch:llama-3.2-1b")
    assert big.rope_parameters["rope_type"] == "llama3" and big.rope_parameters["factor"] == 8.0
    assert small.rope_parameters["factor"] == 32.0
    assert big.tie_word_embeddings is False and small.tie_word_embeddings is True
    assert A.build_config("arch:qwen2.5-7b").rope_parameters["rope_theta"] == 1e6


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_tiny_keeps_the_family_and_attention_layout(name):
    model, tok = A.build_model(f"arch:{name}:tiny", dtype=torch.float32)
    full = A.build_config(f"arch:{name}")
    cfg = model.config
    assert cfg.model_type == full.model_type and type(model).__name__.startswith(type(full).__name__[:-6])
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (full.num_attention_heads, full.num_key_value_heads)
    assert cfg.rope_parameters == full.rope_parameters and cfg.num_hidden_layers == 2 and cfg.head_dim == 16
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    if name.startswith("qwen"):
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases
    assert not model.training and cfg._attn_implementation == "sdpa"
    assert model_name(model) == f"arch:{name}:tiny (random weights)"


def test_building_is_seeded_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = A.build_model("arch:mistral-7b:tiny", dtype=torch.float32)
    after = torch.rand(3)
    b, _ = A.build_model("arch:mistral-7b:tiny", dtype=torch.float32)
    c, _ = A.build_model("arch:mistral-7b:tiny", dtype=torch.float32, seed=1)
    assert torch.equal(after, expected)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_byte_tokenizer_round_trips_any_text():
    tok = A.byte_tokenizer()
    text = "Call me Ishmael. Ça va? 日本 \n\n\ttabs"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.pad_token_id == A.BYTE_EOS


@pytest.mark.parametrize("spec", ["arch:llama-3.1-8b:huge", "arch:gpt-5", "arch:"])
def test_unknown_architecture_names_the_choices(spec):
    with pytest.raises(ConfigError, match="arch:llama-3.1-8b, arch:llama-3.2-1b"):
        load_model(spec, device="cpu")


def test_load_model_builds_named_architectures_with_rope_scaling():
    model, _ = load_model("arch:qwen2.5-7b:tiny", device="cpu", rope_scaling="yarn:4")
    assert model.config.max_position_embeddings == 4 * 32768
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert next(model.parameters()).dtype == torch.float32


def test_kernel_benchmark_shapes_from_architectures():
    assert shape_of("arch:qwen2.5-7b") == (28, 4, 128) and shape_of("arch:llama-3.2-1b") == (32, 8, 64)
    assert shape_of("smollm2") == (9, 3, 64)
    with pytest.raises(ConfigError, match="shape 'bogus'"):
        shape_of("bogus")

    class Args:
        arch, heads, head_dim = "mistral-7b", None, None

    assert attention_shape(Args) == (32, 8, 128) and Args.heads == [32, 8]
    Args.arch, Args.heads, Args.head_dim = None, None, None
    assert attention_shape(Args) == (32, 8, 128)
    Args.arch, Args.heads = "arch:llama-3.2-1b", [4, 2]
    with pytest.raises(ConfigError, match="not both"):
        attention_shape(Args)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bench_e2e_runs_every_architecture_end_to_end(name, tmp_path):
    """`attn-patch bench e2e --model arch:NAME:tiny`: every method measured, decode timed with both
    caches, rows naming the architecture and its random weights appended as the run goes."""
    results = tmp_path / "kernels.csv"
    rc = bench_e2e.main(["--model", f"arch:{name}:tiny", "--device", "cpu", "--lengths", "40", "--decode-tokens", "2",
                         "--skip", "1", "--reps", "1", "--method", "sdpa", "--method", "flash",
                         "--method", "seer:gates=untrained,density=0.5,min_length=0", "--method", "moh",
                         "--results", str(results), "--out", str(tmp_path)])
    assert rc == 0
    rows = read_rows(results)
    assert [(r["provider"], r["mode"]) for r in rows] == [
        (m, mode) for m in ("sdpa", "flash", "seer:gates=untrained,density=0.5,min_length=0", "moh")
        for mode in ("prefill", "decode", "decode-static")]
    assert all(r["extra"].startswith(f"model=arch:{name}:tiny (random weights)") for r in rows)
    assert all("error=" not in r["extra"] and float(r["median_ms"]) > 0 for r in rows)
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["model"] == f"arch:{name}:tiny (random weights)" and len(saved["results"]) == 4
    assert "random weights" in (tmp_path / "e2e.md").read_text()


@pytest.mark.skipif(not BOOKS.is_dir(), reason="needs ../shared/data/books")
def test_train_step_benchmark_runs_an_architecture_end_to_end(tmp_path):
    """scripts/bench_train_step.py on the tiny 8B-layout model: the LongLoRA step and the seer
    distillation step are timed; SDPA pinned to cuDNN cannot run on a CPU and its row says so."""
    results = tmp_path / "kernels.csv"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train_step.py"), "--model",
                          "arch:llama-3.1-8b:tiny", "--data", str(BOOKS / "tinyshakespeare.txt"), "--seq-len", "128",
                          "--steps", "3", "--skip", "1", "--providers", "longlora", "sdpa-cudnn", "seer-distill",
                          "--results", str(results)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["provider"]: r for r in read_rows(results)}
    assert set(rows) == {"longlora", "sdpa-cudnn", "seer-distill"}
    for p in ("longlora", "seer-distill"):
        assert float(rows[p]["median_ms"]) > 0 and "steps=2" in rows[p]["extra"]
        assert rows[p]["extra"].startswith("model=arch:llama-3.1-8b:tiny (random weights),group=0.25")
    assert "error=" in rows["sdpa-cudnn"]["extra"] and rows["sdpa-cudnn"]["median_ms"] == ""
    assert "random weights" in res.stdout and "128 tokens" in res.stdout
