"""End-to-end benchmark: whole-model prefill latency and peak GPU memory per context length, and
decode speed, for each method on the same tokens.

* prefill: ``model(input_ids, logits_to_keep=1)`` with the KV cache filled, as in ``generate``
  (the full [N, vocab] logits would dominate memory at long contexts and no generation needs them);
  median / p20 / p80 over repetitions after a warm-up call (Triton compiles and tunes there);
  peak memory is ``torch.cuda.max_memory_allocated`` during one call.
* decode: greedy ``generate`` of 1 and of ``1 + decode_tokens`` new tokens after the same prompt;
  the difference of the medians is the decode time, reported as ms per token and tokens/s (eager
  decoding, batch 1); where the two timings overlap (p20 of the longer run not above p80 of the
  shorter) the difference is noise: the entry is marked ``decode_noise`` and gets no decode row.

Rows go to the kernel results CSV (``bench`` = "e2e") so the README tables come from one file.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from ..benchmarking import RESULTS_DIR, append_rows, environment, print_table
from ..errors import ConfigError
from .common import (add_common_arguments, markdown_table, max_context, parse_methods, script_main,
                     setup_from_args, write_json)
from .text import generated_filler, load_texts

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768)
DEFAULT_METHODS = ("sdpa-flash", "sdpa-cudnn", "flash")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)

    def q(p):
        return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]

    return statistics.median(ordered), q(0.2), q(0.8)


def prompt_tokens(tokenizer, n: int, texts: list[str] | None = None) -> torch.Tensor:
    """``n`` token ids of natural text (the given texts, else the built-in filler), repeated as needed."""
    text = "\n\n".join(texts) if texts else generated_filler(400, seed=0)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if not ids:
        raise ConfigError("the benchmark text holds no tokens")
    reps = -(-n // len(ids))
    return torch.tensor((ids * reps)[:n], dtype=torch.long)[None]


def bench_prefill(model, ids: torch.Tensor, reps: int) -> dict:
    device = ids.device

    def call():
        with torch.inference_mode():
            return model(input_ids=ids, logits_to_keep=1)

    call()  # warm-up: compilation, autotuning, allocator
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        peak = {"peak_gib": peak / 2**30, "activation_gib": (peak - base) / 2**30}
    p50, p20, p80 = _quantiles(_timed(call, device, reps))
    return {"median_ms": p50 * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3, **(peak or {})}


def bench_decode(model, ids: torch.Tensor, new_tokens: int, reps: int, pad_token_id: int | None) -> dict:
    device = ids.device
    mask = torch.ones_like(ids)

    def generate(n):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=pad_token_id)

    generate(2)  # warm-up: the decode kernels compile on the first cached step
    one = _timed(lambda: generate(1), device, reps)
    many = _timed(lambda: generate(1 + new_tokens), device, reps)
    return decode_speed(one, many, new_tokens)


def decode_speed(one: list[float], many: list[float], new_tokens: int) -> dict:
    """Decode speed from the times (s) of generate(1) and of generate(1 + new_tokens): the difference of
    their medians per token, when the two stand apart (generate(1 + n)'s p20 above generate(1)'s p80).
    Otherwise the difference is timing noise, and the entry says so (``decode_noise``) instead of a speed."""
    one_median, _, one_p80 = _quantiles(one)
    many_median, many_p20, _ = _quantiles(many)
    if many_p20 <= one_p80:
        return {"decode_noise": f"generate(1 + {new_tokens}) {many_median * 1e3:.3g} ms vs generate(1) "
                                f"{one_median * 1e3:.3g} ms: no decode time to tell from the noise "
                                "(raise --decode-tokens or --reps)"}
    per_token = (many_median - one_median) / new_tokens
    return {"ms_per_token": per_token * 1e3, "tokens_per_s": 1.0 / per_token}


def run_benchmark(model, tokenizer, methods, lengths, *, decode_tokens: int = 32, reps: int = 5,
                  texts: list[str] | None = None, allow_beyond_context: bool = False,
                  show_progress: bool = True) -> list[dict]:
    """One result per (method, length): prefill timing and memory, decode speed."""
    limit = max_context(model)
    too_long = [n for n in lengths if limit and n > limit]
    if too_long and not allow_beyond_context:
        raise ConfigError(f"lengths {too_long} exceed the model's {limit} positions: pass --rope-scaling "
                          f"(e.g. linear:{-(-max(too_long) // limit)}) to extend the context")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for n in lengths:
        ids = prompt_tokens(tokenizer, n, texts).to(device)
        for spec in methods:
            with spec.context(model):
                entry = {"method": spec.label, "length": n}
                try:
                    entry.update(bench_prefill(model, ids, reps))
                    if decode_tokens:
                        entry.update(bench_decode(model, ids, decode_tokens, reps, pad))
                except torch.cuda.OutOfMemoryError:
                    entry["error"] = "out of memory"
                    torch.cuda.empty_cache()
            results.append(entry)
            if show_progress:
                print(_progress_line(entry), file=sys.stderr, flush=True)
    return results


def _progress_line(e: dict) -> str:
    if "error" in e:
        return f"# {e['method']} N={e['length']}: {e['error']}"
    parts = [f"prefill {e['median_ms']:.1f} ms"]
    if "peak_gib" in e:
        parts.append(f"peak {e['peak_gib']:.2f} GiB")
    if "tokens_per_s" in e:
        parts.append(f"decode {e['tokens_per_s']:.1f} tok/s")
    if "decode_noise" in e:
        parts.append(f"decode not measured: {e['decode_noise']}")
    return f"# {e['method']} N={e['length']}: " + ", ".join(parts)


def to_rows(results: list[dict], model, dtype, env: dict) -> list[dict]:
    """Rows for the results CSV: one 'prefill' row per measured entry, and one 'decode' row where the
    decode time stood out of the noise."""
    cfg = model.config
    hq = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    from ..families import head_dim

    name = (getattr(cfg, "name_or_path", "") or cfg.model_type).rstrip("/").rsplit("/", 1)[-1]
    rows = []
    for e in results:
        if "error" in e:
            continue
        common = dict(env, bench="e2e", provider=e["method"], dtype=str(dtype).replace("torch.", ""), batch=1,
                      heads_q=hq, heads_kv=hkv, head_dim=head_dim(cfg), causal=True)
        mem = f",peak_gib={e['peak_gib']:.2f}" if "peak_gib" in e else ""
        rows.append(dict(common, mode="prefill", q_len=e["length"], kv_len=e["length"],
                         extra=f"{cfg.model_type}:{name}{mem}", median_ms=round(e["median_ms"], 3),
                         p20_ms=round(e["p20_ms"], 3), p80_ms=round(e["p80_ms"], 3)))
        if "ms_per_token" in e:
            rows.append(dict(common, mode="decode", q_len=1, kv_len=e["length"],
                             extra=f"{cfg.model_type}:{name},tokens_per_s={e['tokens_per_s']:.1f}",
                             median_ms=round(e["ms_per_token"], 4)))
    return rows


def format_table(results: list[dict]) -> tuple[list[str], list[list]]:
    header = ["length", "method", "prefill ms", "vs first", "peak GiB", "decode tok/s"]
    first = {}
    body = []
    for e in results:
        if "error" in e:
            body.append([e["length"], e["method"], e["error"], "", "", ""])
            continue
        base = first.setdefault(e["length"], e["median_ms"])
        body.append([e["length"], e["method"], f"{e['median_ms']:.1f}", f"{base / e['median_ms']:.2f}x",
                     f"{e['peak_gib']:.2f}" if "peak_gib" in e else "-",
                     _decode_cell(e)])
    return header, body


def _decode_cell(e: dict) -> str:
    if "tokens_per_s" in e:
        return f"{e['tokens_per_s']:.1f}"
    return "noise" if "decode_noise" in e else "-"


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), metavar="N",
                        help="prompt lengths in tokens")
    parser.add_argument("--decode-tokens", type=int, default=32,
                        help="tokens generated to time decoding (0 skips the decode measurement)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement")
    parser.add_argument("--data", nargs="+", help="text for the prompts (files, folders, globs; default: a "
                                                  "built-in filler, repeated)")
    parser.add_argument("--results", default=str(RESULTS_DIR / "kernels.csv"),
                        help="results CSV the rows are appended to")
    parser.add_argument("--no-save", action="store_true", help="do not append rows to the results CSV")
    parser.add_argument("--allow-beyond-context", action="store_true",
                        help="allow lengths beyond the model's positions without RoPE scaling")
    add_common_arguments(parser, default_methods=DEFAULT_METHODS)


def run(args) -> int:
    parse_methods(args.method, args.default_methods)  # fail on a typo before loading anything
    texts = [d.text for d in load_texts(args.data)] if args.data else None
    model, tokenizer, methods, device, dtype = setup_from_args(args)
    env = environment()
    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}  transformers {env['transformers']}  "
          f"{model.config.model_type} {dtype}")
    results = run_benchmark(model, tokenizer, methods, args.lengths, decode_tokens=args.decode_tokens,
                            reps=args.reps, texts=texts, allow_beyond_context=args.allow_beyond_context)
    header, body = format_table(results)
    print_table([dict(zip(header, map(str, row))) for row in body], header)
    if any("decode_noise" in e for e in results):
        print("# decode 'noise': generating more tokens did not take clearly longer; no decode row is written")
    rows = to_rows(results, model, dtype, env)
    if not args.no_save and rows:
        print(f"# appended {len(rows)} rows to {append_rows(rows, args.results)}")
    if args.out:
        from pathlib import Path

        write_json({"environment": env, "rope_parameters": getattr(model.config, "rope_parameters", None),
                    "results": results}, Path(args.out) / "e2e.json")
        (Path(args.out) / "e2e.md").write_text(markdown_table(header, body) + "\n")
    return 0


def main(argv=None) -> int:
    return script_main(add_arguments, run, __doc__, argv, prog="bench_e2e")


if __name__ == "__main__":
    sys.exit(main())
