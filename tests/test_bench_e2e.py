"""End-to-end benchmark on a tiny model on CPU: every (method, length) is measured, rows land in the
results file, and lengths beyond the model's positions ask for RoPE scaling."""
import pytest
import torch

from attn_patch.benchmarking import read_rows
from attn_patch.errors import ConfigError
from attn_patch.evals import bench_e2e
from attn_patch.evals.common import parse_methods
from tiny_models import build


class _Tokenizer:
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [2 + (ord(c) % 90) for c in text]}


def test_e2e_measures_every_method_and_length(tmp_path):
    torch.manual_seed(0)
    model = build("llama")
    methods = parse_methods(["sdpa", "flash:backend=reference"])
    results = bench_e2e.run_benchmark(model, _Tokenizer(), methods, [24, 40], decode_tokens=3, reps=2,
                                      show_progress=False)
    assert [(r["method"], r["length"]) for r in results] == [
        ("sdpa", 24), ("flash:backend=reference", 24), ("sdpa", 40), ("flash:backend=reference", 40)]
    for r in results:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["tokens_per_s"] > 0
    assert model.config._attn_implementation == "sdpa"  # unpatched afterwards
    env = {"date": "d", "gpu": "cpu", "torch": "t", "triton": "-", "transformers": "x"}
    rows = bench_e2e.to_rows(results, model, torch.float32, env)
    path = tmp_path / "kernels.csv"
    from attn_patch.benchmarking import append_rows

    append_rows(rows, path)
    back = read_rows(path)
    assert len(back) == 8 and {r["mode"] for r in back} == {"prefill", "decode"}
    assert all(r["bench"] == "e2e" and float(r["median_ms"]) > 0 for r in back)
    header, body = bench_e2e.format_table(results)
    assert len(body) == 4 and body[0][3] == "1.00x"


def test_prompt_tokens_exact_length():
    ids = bench_e2e.prompt_tokens(_Tokenizer(), 5000)
    assert ids.shape == (1, 5000)


def test_e2e_asks_for_rope_scaling_beyond_the_context():
    model = build("llama")  # 512 positions
    with pytest.raises(ConfigError, match="rope-scaling"):
        bench_e2e.run_benchmark(model, _Tokenizer(), parse_methods(["sdpa"]), [1024], show_progress=False)
