"""End-to-end benchmark on tiny models on CPU: every (method, length) is measured, decode is timed
per cache kind after the chosen lengths, what cannot run says why in its cell and its row, rows
land in the results file, and lengths beyond the model's positions ask for RoPE scaling."""
import importlib.util
from pathlib import Path

import pytest
import torch

from attn_patch.benchmarking import append_rows, read_rows
from attn_patch.errors import ConfigError
from attn_patch.evals import bench_e2e
from attn_patch.evals.common import parse_methods
from tiny_models import build

ROOT = Path(__file__).resolve().parent.parent


class _Tokenizer:
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [2 + (ord(c) % 90) for c in text]}


def test_e2e_measures_every_method_and_length(tmp_path):
    """What the benchmark guarantees whatever the timings: one entry per (length, method), ordered
    quantiles, decode speeds for both cache kinds only after the decode lengths, and the rows that
    follow from them."""
    torch.manual_seed(0)
    model = build("llama")
    methods = parse_methods(["sdpa", "flash:backend=reference"])
    results = bench_e2e.run_benchmark(model, _Tokenizer(), methods, [24, 40], decode_tokens=3, decode_lengths=[40],
                                      skip=1, reps=2, show_progress=False)
    assert [(r["method"], r["length"]) for r in results] == [
        ("sdpa", 24), ("flash:backend=reference", 24), ("sdpa", 40), ("flash:backend=reference", 40)]
    for r in results:
        assert "error" not in r, r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        if r["length"] == 24:
            assert "decode" not in r
            continue
        assert set(r["decode"]) == {"dynamic", "static"}
        for d in r["decode"].values():
            assert "error" not in d, d
            assert d["steps"] == 3  # decode_tokens intervals timed after the skipped ones
            assert d["p20_ms"] <= d["ms_per_token"] <= d["p80_ms"]
            assert d["tokens_per_s"] == pytest.approx(1e3 / d["ms_per_token"])
    assert model.config._attn_implementation == "sdpa"  # unpatched afterwards
    env = {"date": "d", "gpu": "cpu", "torch": "t", "triton": "-", "transformers": "x"}
    rows = bench_e2e.to_rows(results, model, torch.float32, env)
    path = tmp_path / "kernels.csv"
    append_rows(rows, path)
    back = read_rows(path)
    assert [r["mode"] for r in back] == ["prefill", "prefill", "prefill", "decode", "decode-static",
                                         "prefill", "decode", "decode-static"]
    assert all(r["bench"] == "e2e" and r["extra"].startswith("model=llama:") for r in back)
    decode = [r for r in back if r["mode"] == "decode-static"]
    assert [float(r["median_ms"]) for r in decode] == [round(e["decode"]["static"]["ms_per_token"], 4)
                                                        for e in results if "decode" in e]
    header, body = bench_e2e.format_table(results)
    assert len(body) == 4 and body[0][3] == "1.00x" and header[-2:] == ["decode tok/s (dynamic)",
                                                                        "decode tok/s (static)"]


def test_decode_stats_from_step_times():
    """The intervals between tokens after the skipped ones: median, p20, p80 per token."""
    times = [0.0, 1.0, 1.010, 1.022, 1.030, 1.041]  # the first interval is the compilation, skipped
    d = bench_e2e.decode_stats(times, skip=1)
    assert d["steps"] == 4 and d["ms_per_token"] == pytest.approx(10.5)
    assert d["p20_ms"] == pytest.approx(10.0) and d["p80_ms"] == pytest.approx(11.0)
    with pytest.raises(ConfigError, match="decode-tokens"):
        bench_e2e.decode_stats([0.0, 1.0], skip=1)


@pytest.mark.parametrize("spec", ["sdpa", "flash:backend=reference"])
def test_decoding_from_the_prefill_cache_matches_a_fresh_generate(spec):
    """The benchmark decodes from the prefill's cache (dynamic, and copied into a StaticCache): the
    tokens are the ones generate() makes from the prompt alone, so the timed work is the real work."""
    torch.manual_seed(1)
    model = build("llama")
    ids = torch.randint(2, 90, (1, 30))
    (method,) = parse_methods([spec])
    with method.context(model):
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 30:]
        for kind in ("dynamic", "static"):
            stats, out = bench_e2e.bench_prefill(model, ids, reps=1)
            name = "cache" if "cache" in out else "past_key_values"
            prompt = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            cache = out[name] if kind == "dynamic" else bench_e2e.static_copy(model, out[name], 40)
            with torch.no_grad():
                got = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **{name: cache},
                                     max_new_tokens=5, do_sample=False, pad_token_id=0)[0, 30:]
            assert got.tolist() == expected.tolist(), kind


def test_a_failed_measurement_says_why_in_its_cell_and_row(monkeypatch):
    """A method that cannot prefill, or cannot decode with one cache kind, gets the reason in its
    entry, its table cell and its result row; the other measurements go on."""
    model = build("llama")
    real_generate = model.generate

    def generate(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if type(cache).__name__ == "StaticCache":
            raise RuntimeError("no kernel for this cache, try another\nsecond line")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    methods = parse_methods(["sdpa", "flash:backend=reference"])
    real_prefill = bench_e2e.bench_prefill

    def prefill(model_, ids, reps, *a):
        if model_.config._attn_implementation != "sdpa":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12 GiB")
        return real_prefill(model_, ids, reps, *a)

    monkeypatch.setattr(bench_e2e, "bench_prefill", prefill)
    results = bench_e2e.run_benchmark(model, _Tokenizer(), methods, [20], decode_tokens=2, skip=1, reps=1,
                                      show_progress=False)
    sdpa, flash = results
    assert "tokens_per_s" in sdpa["decode"]["dynamic"]
    assert sdpa["decode"]["static"]["error"] == "RuntimeError: no kernel for this cache, try another ... second line"
    assert sdpa["decode"]["static"]["detail"] == "RuntimeError: no kernel for this cache, try another\nsecond line"
    assert flash.pop("detail").startswith("OutOfMemoryError: CUDA out of memory")
    assert flash == {"method": "flash:backend=reference", "length": 20, "error": "out of memory"}
    assert model.config._attn_implementation == "sdpa"
    rows = bench_e2e.to_rows(results, model, torch.float32, {})
    assert [(r["provider"], r["mode"]) for r in rows] == [("sdpa", "prefill"), ("sdpa", "decode"),
                                                          ("sdpa", "decode-static"),
                                                          ("flash:backend=reference", "prefill")]
    static = next(r for r in rows if r["mode"] == "decode-static")
    assert static["extra"].endswith("error=RuntimeError: no kernel for this cache; try another ... second line")
    assert "median_ms" not in static
    failed = next(r for r in rows if r["provider"].startswith("flash"))
    assert failed["mode"] == "prefill" and failed["extra"].endswith("error=out of memory")
    _, body = bench_e2e.format_table(results)
    assert body[0][-1].startswith("RuntimeError") and body[1][2] == "out of memory"


def test_prompt_tokens_exact_length():
    ids = bench_e2e.prompt_tokens(_Tokenizer(), 5000)
    assert ids.shape == (1, 5000)


def test_e2e_asks_for_rope_scaling_beyond_the_context():
    model = build("llama")  # 512 positions
    with pytest.raises(ConfigError, match="rope-scaling"):
        bench_e2e.run_benchmark(model, _Tokenizer(), parse_methods(["sdpa"]), [1024], show_progress=False)


def test_e2e_refuses_decode_lengths_it_does_not_prefill():
    model = build("llama")
    with pytest.raises(ConfigError, match=r"decode lengths \[64\]"):
        bench_e2e.run_benchmark(model, _Tokenizer(), parse_methods(["sdpa"]), [32], decode_lengths=[64],
                                show_progress=False)


def _readme_tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "scripts" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_e2e_tables_put_the_8b_shape_first_and_say_what_did_not_run():
    env = {"date": "d", "gpu": "GPU", "torch": "t", "triton": "-", "transformers": "x", "bench": "e2e",
           "dtype": "bfloat16", "batch": 1}
    big = "model=arch:llama-3.1-8b (random weights)"
    cases = [  # provider, mode, median ms, extra
        ("sdpa-flash", "prefill", "10", "llama:SmolLM2.gguf,peak_gib=0.40"),
        ("sdpa-flash", "prefill", "200", f"{big},peak_gib=20.00"),
        ("flash", "prefill", "100", f"{big},peak_gib=20.00"),
        ("flash", "decode-static", "", f"{big},error=BackendCompilerFailed: boom"),
        ("sdpa-flash", "decode-static", "20", f"{big},tokens_per_s=50.0,steps=4"),
        ("sdpa-flash", "prefill", "100", "model=arch:llama-3.2-1b (random weights),peak_gib=3.00"),
    ]
    rows = [dict(env, provider=p, mode=mode, q_len=1 if mode.startswith("decode") else 8, kv_len=8, median_ms=ms,
                 extra=extra) for p, mode, ms, extra in cases]
    text = _readme_tables().e2e_tables([{k: str(v) for k, v in r.items()} for r in rows])
    order = [text.index(name) for name in ("arch:llama-3.1-8b", "arch:llama-3.2-1b", "SmolLM2")]
    assert order == sorted(order)
    assert "| 8 | 200.0 ms (1.00x; 20.0 GiB) | 100.0 ms (2.00x; 20.0 GiB) |" in text
    assert "| 8 | static | 50.0 | did not run: BackendCompilerFailed: boom |" in text
    long_report = ("InductorError: SubprocException: An exception occurred in a subprocess: ... "
                   "triton.compiler.errors.CompilationError: at 53:14:")
    cell = _readme_tables()._error({"extra": f"{big},error={long_report}"})
    assert cell == "InductorError (triton.compiler.errors.CompilationError: at 53:14)"
    assert "speed and memory only" in text


def test_readme_train_step_tables_show_failures_and_the_distillation_step():
    env = {"date": "d", "gpu": "GPU", "torch": "t", "triton": "-", "transformers": "x", "bench": "train-step",
           "dtype": "bf16-autocast", "batch": 1, "mode": "step", "q_len": 65536, "kv_len": 65536}
    model = "model=arch:llama-3.1-8b (random weights),group=0.25"
    rows = [dict(env, provider="longlora", median_ms="1000", extra=f"{model},peak_gib=80.5,steps=3"),
            dict(env, provider="sdpa-flash", median_ms="", extra=f"{model},error=out of memory (139 GiB GPU)"),
            dict(env, provider="seer-distill", median_ms="3000", extra=f"{model},peak_gib=40,steps=3")]
    text = _readme_tables().train_step_tables([{k: str(v) for k, v in r.items()} for r in rows])
    assert "| S2-Attn (ours) | 1000.0 ms | 80.50 GiB | 1.00x |" in text
    assert "| SDPA flash | did not run: out of memory (139 GiB GPU) | | |" in text
    assert "| seer gate distillation (frozen model, gates trained) | 3000.0 ms | 40.00 GiB | - |" in text


def test_static_decode_refuses_a_sliding_window_cache():
    """Mistral with a sliding window keeps only the window in its cache layers: copying them into a
    StaticCache would misplace positions, so that cell says why instead of timing wrong work."""
    model = build("mistral")  # sliding_window=6
    results = bench_e2e.run_benchmark(model, _Tokenizer(), parse_methods(["sdpa"]), [20], decode_tokens=2, skip=1,
                                      reps=1, show_progress=False)
    (entry,) = results
    assert "tokens_per_s" in entry["decode"]["dynamic"]
    assert "full-attention" in entry["decode"]["static"]["error"]


def test_a_compiler_report_is_summarised_by_the_error_raised_inside_it():
    """Inductor wraps a subprocess's traceback and ends with advice; the cell must name the error
    that was raised inside, and the JSON keeps the whole report."""
    report = ("SubprocException: An exception occurred in a subprocess:\n\nTraceback (most recent call last):\n"
              '  File "x.py", line 3, in f\n    g()\nAssertionError: shared memory 262144 exceeds 232448\n\n'
              "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're "
              "reporting a bug to PyTorch).")
    exc = RuntimeError(report)
    line = bench_e2e.failure(exc)
    assert line.startswith("RuntimeError: SubprocException")
    assert line.endswith("AssertionError: shared memory 262144 exceeds 232448")
    assert "TORCHDYNAMO_VERBOSE" in bench_e2e.detail(exc)
    assert bench_e2e.failure(ValueError("one line")) == "ValueError: one line"
    assert bench_e2e.failure(ValueError("first\nsecond")) == "ValueError: first ... second"
