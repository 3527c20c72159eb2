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
    """What the benchmark guarantees whatever the timings: one entry per (method, length), ordered
    quantiles, a decode speed or a noise mark per entry, and the rows that follow from them."""
    torch.manual_seed(0)
    model = build("llama")
    methods = parse_methods(["sdpa", "flash:backend=reference"])
    results = bench_e2e.run_benchmark(model, _Tokenizer(), methods, [24, 40], decode_tokens=3, reps=2,
                                      show_progress=False)
    assert [(r["method"], r["length"]) for r in results] == [
        ("sdpa", 24), ("flash:backend=reference", 24), ("sdpa", 40), ("flash:backend=reference", 40)]
    for r in results:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert ("tokens_per_s" in r) != ("decode_noise" in r)
        if "tokens_per_s" in r:
            assert r["ms_per_token"] > 0 and r["tokens_per_s"] == pytest.approx(1e3 / r["ms_per_token"])
    assert model.config._attn_implementation == "sdpa"  # unpatched afterwards
    env = {"date": "d", "gpu": "cpu", "torch": "t", "triton": "-", "transformers": "x"}
    rows = bench_e2e.to_rows(results, model, torch.float32, env)
    path = tmp_path / "kernels.csv"
    from attn_patch.benchmarking import append_rows

    append_rows(rows, path)
    back = read_rows(path)
    decoded = [r for r in results if "tokens_per_s" in r]
    assert [r["mode"] for r in back] == [mode for r in results
                                         for mode in ("prefill", "decode")[:2 if "tokens_per_s" in r else 1]]
    assert all(r["bench"] == "e2e" for r in back)
    assert [float(r["median_ms"]) for r in back if r["mode"] == "decode"] == \
        [round(r["ms_per_token"], 4) for r in decoded]
    header, body = bench_e2e.format_table(results)
    assert len(body) == 4 and body[0][3] == "1.00x"


def _constant_timer(seconds):
    return lambda fn, device, reps: [seconds] * reps


def test_e2e_decode_within_the_noise_is_marked_not_reported(monkeypatch):
    """generate(1 + n) timed no slower than generate(1): no decode speed is made up from the
    difference (it used to be clamped to 1e-9 s, written as 0 ms per token, 3e9 tokens/s)."""
    monkeypatch.setattr(bench_e2e, "_timed", _constant_timer(0.002))
    model = build("llama")
    results = bench_e2e.run_benchmark(model, _Tokenizer(), parse_methods(["sdpa"]), [16], decode_tokens=3, reps=2,
                                      show_progress=False)
    (entry,) = results
    assert "tokens_per_s" not in entry and "ms_per_token" not in entry
    assert "noise" in entry["decode_noise"] and "--decode-tokens" in entry["decode_noise"]
    rows = bench_e2e.to_rows(results, model, torch.float32, {})
    assert [r["mode"] for r in rows] == ["prefill"]
    assert bench_e2e.format_table(results)[1][0][5] == "noise"


def test_decode_speed_from_timings():
    """The median difference per token when the two timings stand apart; noise when their p20..p80
    spreads overlap, even when the medians differ."""
    speed = bench_e2e.decode_speed([0.010, 0.011, 0.012], [0.040, 0.041, 0.042], 10)
    assert speed["ms_per_token"] == pytest.approx(3.0) and speed["tokens_per_s"] == pytest.approx(1e3 / 3.0)
    assert set(bench_e2e.decode_speed([0.010, 0.011, 0.030], [0.020, 0.021, 0.022], 10)) == {"decode_noise"}
    assert set(bench_e2e.decode_speed([0.020, 0.020], [0.019, 0.019], 4)) == {"decode_noise"}


def test_prompt_tokens_exact_length():
    ids = bench_e2e.prompt_tokens(_Tokenizer(), 5000)
    assert ids.shape == (1, 5000)


def test_e2e_asks_for_rope_scaling_beyond_the_context():
    model = build("llama")  # 512 positions
    with pytest.raises(ConfigError, match="rope-scaling"):
        bench_e2e.run_benchmark(model, _Tokenizer(), parse_methods(["sdpa"]), [1024], show_progress=False)
