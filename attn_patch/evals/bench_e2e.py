"""End-to-end benchmark: whole-model prefill latency and peak GPU memory per context length, and
decode speed, for each method on the same tokens.

* prefill: ``model(input_ids, logits_to_keep=1)`` with the KV cache filled, as in ``generate``
  (the full [N, vocab] logits would dominate memory at long contexts and no generation needs them);
  median / p20 / p80 over ``--reps`` calls after a warm-up call on the same prompt (Triton
  compiles and autotunes there); peak memory is ``torch.cuda.max_memory_allocated`` over those calls,
  with the cache each one builds.
* decode: greedy ``generate`` continuing from the last prefill's cache (the prompt is not run
  again), batch 1, once with transformers' dynamic cache (eager) and once with its static cache
  (the cache copied into a ``StaticCache``; on a GPU generate() then compiles the decoding step,
  with CUDA graphs, as it does for ``cache_implementation="static"``). Every token's finish is
  timed; the median interval after the first ``--skip`` steps (compilation, graph capture) is the
  time per token.
* a method that cannot run a measurement (out of memory, an unsupported cache, a compiler error)
  gets the reason in its cell and in its result row.

``--model arch:llama-3.1-8b`` (qwen2.5-7b, mistral-7b, llama-3.2-1b) times a named architecture with
random weights: speed and memory only. Rows go to the results CSV (``bench`` = "e2e") as each
measurement finishes, so the README tables come from one file and an interrupted run keeps what it
measured.
"""
from __future__ import annotations

import gc
import re
import statistics
import sys
import time

import torch

from ..benchmarking import RESULTS_DIR, append_rows, autotune_note, environment, print_table
from ..errors import ConfigError
from .common import (add_common_arguments, markdown_table, max_context, parse_methods, script_main,
                     setup_from_args, write_json)
from .text import generated_filler, load_texts

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768)
DEFAULT_METHODS = ("sdpa-flash", "sdpa-cudnn", "flash")
CACHES = ("dynamic", "static")
DECODE_MODES = {"dynamic": "decode", "static": "decode-static"}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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


def bench_prefill(model, ids: torch.Tensor, reps: int):
    """(timings and peak memory, the last call's output): ``reps`` calls of the whole prompt after one
    warm-up call on the same prompt (kernel compilation, and autotuning, which is per length bucket)."""
    device = ids.device

    def call(x):
        with torch.no_grad():  # not inference_mode: generate() later appends to this call's cache in place
            return model(input_ids=x, logits_to_keep=1)

    call(ids)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times, out = [], None
    for _ in range(reps):
        out = None  # the previous call's cache goes before the next is built
        _sync(device)
        start = time.perf_counter()
        out = call(ids)
        _sync(device)
        times.append(time.perf_counter() - start)
    p50, p20, p80 = _quantiles(times)
    stats = {"median_ms": p50 * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        stats.update(peak_gib=peak / 2**30, activation_gib=(peak - base) / 2**30)
    return stats, out


class StepTimes:
    """A stopping criterion that never stops generation and records when each token was produced
    (after the GPU finished it: generate() waits for every step's tokens anyway)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        _sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_stats(times: list[float], skip: int) -> dict:
    """Decode speed from the moments successive tokens were produced: the intervals between them
    after the first ``skip`` (compilation, CUDA-graph capture), median / p20 / p80 ms per token."""
    steps = [b - a for a, b in zip(times, times[1:])][skip:]
    if not steps:
        raise ConfigError(f"no decode step left to time after the first {skip}: raise --decode-tokens")
    p50, p20, p80 = _quantiles(steps)
    return {"ms_per_token": p50 * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3, "tokens_per_s": 1.0 / p50,
            "steps": len(steps)}


def static_copy(model, cache, max_len: int):
    """A transformers ``StaticCache`` of ``max_len`` positions holding what ``cache`` (the prefill's
    dynamic cache) holds: the prompt is not run twice."""
    from transformers import StaticCache

    if kinds := sorted({type(layer).__name__ for layer in cache.layers} - {"DynamicLayer"}):
        # a sliding-window layer keeps only its window: copying it would misplace the positions
        raise ConfigError(f"the prompt's cache has {', '.join(kinds)} layers: decoding from a copied static cache "
                          "is for full-attention models (use --cache dynamic)")
    static = StaticCache(config=model.config, max_cache_len=max_len)
    for i, layer in enumerate(cache.layers):
        static.update(layer.keys, layer.values, i)
    return static


def bench_decode(model, ids: torch.Tensor, output, caches, new_tokens: int, skip: int,
                 pad_token_id: int | None) -> dict:
    """Greedy ``generate`` of ``1 + skip + new_tokens`` tokens continuing the prefill ``output`` (its
    cache holds the prompt ``ids``), once per cache kind: "dynamic" (transformers' default, eager) and
    "static" (``StaticCache``: generate() compiles the decoding step where transformers does, on
    GPUs). Returns {cache kind: decode_stats or {"error": why}}."""
    device = ids.device
    prompt = torch.cat([ids, output.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    steps = 1 + skip + new_tokens  # the first token's finish starts the clock: skip + new_tokens intervals
    # transformers >= 5.25 names the cache "cache" (output field and generate() argument), before that
    # "past_key_values"
    name = "cache" if "cache" in output else "past_key_values"
    made = {}
    if "static" in caches:
        try:
            made["static"] = static_copy(model, output[name], prompt.shape[1] + steps)
        except torch.cuda.OutOfMemoryError:
            made["static"] = "out of memory (copying the prompt's cache into a StaticCache)"
        except ConfigError as exc:
            made["static"] = str(exc)
    if "dynamic" in caches:
        made["dynamic"] = output[name]
    result = {}
    for kind in caches:
        cache = made.pop(kind)
        if isinstance(cache, str):
            result[kind] = {"error": cache}
            continue
        timer = StepTimes(device)
        try:
            with torch.no_grad():
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **{name: cache},
                               max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                               pad_token_id=pad_token_id, stopping_criteria=[timer])
            result[kind] = decode_stats(timer.times, skip)
        except Exception as exc:  # noqa: BLE001  (the cell says why this method cannot decode so)
            result[kind] = {"error": failure(exc), "detail": detail(exc)}
        finally:
            del cache
            if kind == "static":
                _forget_compiled(model)
    return result


def _forget_compiled(model) -> None:
    """Drop what generate() compiled for a static cache, so the next method compiles its own step and
    the CUDA graphs' memory is returned."""
    model.__dict__.pop("_compiled_call", None)
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# lines a compiler report ends with that say how to get more output, not what went wrong
_BOILERPLATE = ("Set TORCHDYNAMO_VERBOSE", "You can suppress", "For more information", "Traceback (most recent",
                "To execute this test", "from user code", "The above exception")
_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b:")


def failure(exc: BaseException) -> str:
    """One line naming why a measurement could not run: out of memory, or the error's first line
    and, when the message goes on (a compiler's report, a subprocess's traceback), the last raised
    error inside it, which is where the cause is (else its last line that is not boilerplate)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    rest = [line for line in lines[1:] if not line.startswith(_BOILERPLATE)]
    if rest:
        raised = [line for line in rest if _RAISED.match(line)]
        text = f"{lines[0][:100]} ... {(raised or rest)[-1]}"
    return f"{type(exc).__name__}: {text[:240]}"


def detail(exc: BaseException) -> str:
    """The error's whole message (the JSON keeps it; tables and rows show ``failure``)."""
    return f"{type(exc).__name__}: {exc}"[:20000]


def run_benchmark(model, tokenizer, methods, lengths, *, decode_tokens: int = 32, decode_lengths=None,
                  caches=CACHES, skip: int = 3, reps: int = 5, texts: list[str] | None = None,
                  allow_beyond_context: bool = False, show_progress: bool = True, on_entry=None) -> list[dict]:
    """One entry per (length, method): prefill timing and memory, and after the lengths in
    ``decode_lengths`` (default: all) decode speed per cache kind. A method that cannot run a
    measurement gets the reason instead (``error`` for the prefill, ``{"error": ...}`` per cache).
    ``on_entry(entry)`` is called as each entry is done (results are saved as they come)."""
    limit = max_context(model)
    too_long = [n for n in lengths if limit and n > limit]
    if too_long and not allow_beyond_context:
        raise ConfigError(f"lengths {too_long} exceed the model's {limit} positions: pass --rope-scaling "
                          f"(e.g. linear:{-(-max(too_long) // limit)}) to extend the context")
    decode_lengths = set(lengths if decode_lengths is None else decode_lengths)
    if missing := sorted(decode_lengths - set(lengths)):
        raise ConfigError(f"decode lengths {missing} are not among the prompt lengths {list(lengths)}")
    if unknown := [c for c in caches if c not in CACHES]:
        raise ConfigError(f"cache kinds {unknown}: use {' and/or '.join(CACHES)}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for n in lengths:
        ids = prompt_tokens(tokenizer, n, texts).to(device)
        for spec in methods:
            entry = {"method": spec.label, "length": n}
            output = None
            try:
                with spec.context(model):
                    stats, output = bench_prefill(model, ids, reps)
                    entry.update(stats)
                    if decode_tokens and n in decode_lengths:
                        entry["decode"] = bench_decode(model, ids, output, caches, decode_tokens, skip, pad)
            except Exception as exc:  # noqa: BLE001  (the cell says why this method cannot run here)
                entry = {"method": spec.label, "length": n, "error": failure(exc), "detail": detail(exc)}
            finally:
                output = None
                gc.collect()  # a failed measurement's traceback holds its caches until collected
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(entry)
            if on_entry is not None:
                on_entry(entry)
            if show_progress:
                print(_progress_line(entry), file=sys.stderr, flush=True)
    return results


def _progress_line(e: dict) -> str:
    if "error" in e:
        return f"# {e['method']} N={e['length']}: {e['error']}"
    parts = [f"prefill {e['median_ms']:.1f} ms"]
    if "peak_gib" in e:
        parts.append(f"peak {e['peak_gib']:.2f} GiB")
    for kind, d in e.get("decode", {}).items():
        parts.append(f"decode ({kind} cache) " + (f"{d['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in d
                                                  else d["error"]))
    return f"# {e['method']} N={e['length']}: " + ", ".join(parts)


def model_label(model) -> str:
    """The model as the results name it: ``arch:NAME (random weights)``, else the file or folder name."""
    from .common import model_name

    name = model_name(model)
    return name if name.startswith("arch:") else f"{model.config.model_type}:{name.rstrip('/').rsplit('/', 1)[-1]}"


def _clean(text: str) -> str:
    return text.replace(",", ";").replace("\n", " ")


def to_rows(results: list[dict], model, dtype, env: dict) -> list[dict]:
    """Rows for the results CSV: per entry a 'prefill' row, and a 'decode' (dynamic cache) or
    'decode-static' row per cache kind timed; what could not run is a row with ``error=`` in extra
    and no time, so the README's cells say why too."""
    cfg = model.config
    hq = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    from ..families import head_dim

    model_part = f"model={model_label(model)}{autotune_note()}"
    rows = []
    for e in results:
        common = dict(env, bench="e2e", provider=e["method"], dtype=str(dtype).replace("torch.", ""), batch=1,
                      heads_q=hq, heads_kv=hkv, head_dim=head_dim(cfg), causal=True)
        prefill = dict(common, mode="prefill", q_len=e["length"], kv_len=e["length"])
        if "error" in e:
            rows.append(dict(prefill, extra=f"{model_part},error={_clean(e['error'])}"))
            continue
        mem = "".join(f",{k}={e[k]:.2f}" for k in ("peak_gib", "activation_gib") if k in e)
        rows.append(dict(prefill, extra=model_part + mem, median_ms=round(e["median_ms"], 3),
                         p20_ms=round(e["p20_ms"], 3), p80_ms=round(e["p80_ms"], 3)))
        for kind, d in e.get("decode", {}).items():
            row = dict(common, mode=DECODE_MODES[kind], q_len=1, kv_len=e["length"])
            if "error" in d:
                rows.append(dict(row, extra=f"{model_part},error={_clean(d['error'])}"))
            else:
                rows.append(dict(row, extra=f"{model_part},tokens_per_s={d['tokens_per_s']:.1f},steps={d['steps']}",
                                 median_ms=round(d["ms_per_token"], 4), p20_ms=round(d["p20_ms"], 4),
                                 p80_ms=round(d["p80_ms"], 4)))
    return rows


def format_table(results: list[dict], caches=CACHES) -> tuple[list[str], list[list]]:
    header = ["length", "method", "prefill ms", "vs first", "peak GiB"] + [f"decode tok/s ({c})" for c in caches]
    first = {}
    body = []
    for e in results:
        if "error" in e:
            body.append([e["length"], e["method"], e["error"], "", ""] + [""] * len(caches))
            continue
        base = first.setdefault(e["length"], e["median_ms"])
        decode = e.get("decode", {})
        body.append([e["length"], e["method"], f"{e['median_ms']:.1f}", f"{base / e['median_ms']:.2f}x",
                     f"{e['peak_gib']:.2f}" if "peak_gib" in e else "-"]
                    + [_decode_cell(decode.get(c)) for c in caches])
    return header, body


def _decode_cell(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{d['tokens_per_s']:.1f}" if "tokens_per_s" in d else d["error"]


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), metavar="N",
                        help="prompt lengths in tokens")
    parser.add_argument("--decode-tokens", type=int, default=32,
                        help="decode steps timed per cache kind (0 skips the decode measurement)")
    parser.add_argument("--decode-lengths", type=int, nargs="+", metavar="N",
                        help="prompt lengths after which decoding is timed (default: every length)")
    parser.add_argument("--cache", nargs="+", default=list(CACHES), choices=list(CACHES),
                        help="KV caches to decode with: dynamic (eager) and/or static (compiled by generate() on a GPU)")
    parser.add_argument("--skip", type=int, default=3,
                        help="decode steps left out before timing (compilation, CUDA-graph capture)")
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
    for option, value, least in (("--reps", args.reps, 1), ("--decode-tokens", args.decode_tokens, 0),
                                 ("--skip", args.skip, 0)):
        if value < least:
            raise ConfigError(f"{option} must be at least {least}, got {value}")
    texts = [d.text for d in load_texts(args.data)] if args.data else None
    model, tokenizer, methods, device, dtype = setup_from_args(args)
    env = environment()
    name = model_label(model)
    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}  transformers {env['transformers']}  "
          f"{name}  {dtype}")
    out = None
    if args.out:
        from pathlib import Path

        out = Path(args.out)
    saved = []

    done: list[dict] = []
    rope = getattr(model.config, "rope_parameters", None)

    def keep(entry):  # rows and JSON as each measurement finishes: an interrupted run keeps what it measured
        done.append(entry)
        if not args.no_save:
            rows = to_rows([entry], model, dtype, env)
            append_rows(rows, args.results)
            saved.extend(rows)
        if out is not None:
            write_json({"environment": env, "model": name, "rope_parameters": rope, "results": done}, out / "e2e.json")

    results = run_benchmark(model, tokenizer, methods, args.lengths, decode_tokens=args.decode_tokens,
                            decode_lengths=args.decode_lengths, caches=tuple(args.cache), skip=args.skip,
                            reps=args.reps, texts=texts, allow_beyond_context=args.allow_beyond_context,
                            on_entry=keep)
    header, body = format_table(results, tuple(args.cache))
    print(f"\n{name}, {dtype}, batch 1; prefill median of {args.reps}; decode tokens/s after the prompt "
          f"(median of {args.decode_tokens} steps)")
    print_table([dict(zip(header, map(str, row))) for row in body], header)
    if saved:
        print(f"# appended {len(saved)} rows to {args.results}")
    if out is not None:
        (out / "e2e.md").write_text(f"{name}, {dtype}\n\n" + markdown_table(header, body) + "\n")
    return 0


def main(argv=None) -> int:
    return script_main(add_arguments, run, __doc__, argv, prog="bench_e2e")


if __name__ == "__main__":
    sys.exit(main())
