#!/usr/bin/env python
"""Training-step benchmark: the recipes' own steps (forward, backward, AdamW) under each attention,
on the same model, data and settings.

    python scripts/bench_train_step.py --data ../shared/data/books/moby_dick.txt \\
        --seq-len 32768 --rope-scaling linear:4 --steps 12
    # an 8B shape with random weights (speed and memory only), 32k and 64k tokens
    python scripts/bench_train_step.py --model arch:llama-3.1-8b --data BOOKS --seq-len 32768 65536 --steps 5 --skip 2

Each provider runs its recipe in its own process (so one provider's memory does not count for the
next). LongLoRA's step (``recipes/longlora_train.py``: LoRA + embeddings and norms, gradient
checkpointing, bf16 autocast over fp32 weights) with ``longlora`` (S2-Attn on our kernel), ``flash``
(our dense kernel), ``sdpa-flash`` and ``sdpa-cudnn`` (transformers' SDPA attention pinned to one
torch backend); ``seer-distill`` is SeerAttention's gate distillation step
(``recipes/seer_distill.py``: frozen bf16 model, dense teacher attention with the block ground
truth, gates trained). The median step time skips the first ``--skip`` steps (compilation,
autotuning); peak memory is ``torch.cuda.max_memory_allocated`` over the training loop. A provider
that fails (out of memory, say) gets the reason in its row. Prints a table per length and appends
rows (bench "train-step") to results/kernels.csv, failures included.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout
from attn_patch import architectures  # noqa: E402
from attn_patch.benchmarking import RESULTS_DIR, append_rows, autotune_note, environment, print_table  # noqa: E402
from attn_patch.evals.common import HelpFormatter  # noqa: E402

LONGLORA = ROOT / "recipes" / "longlora_train.py"
SEER = ROOT / "recipes" / "seer_distill.py"
PROVIDERS = {
    "longlora": (LONGLORA, ["--attention", "longlora"]),
    "flash": (LONGLORA, ["--attention", "flash"]),
    "sdpa-flash": (LONGLORA, ["--attention", "sdpa", "--sdpa-backend", "flash"]),
    "sdpa-cudnn": (LONGLORA, ["--attention", "sdpa", "--sdpa-backend", "cudnn"]),
    "seer-distill": (SEER, ["--calibrate-windows", "0"]),
}
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def command(name: str, args, seq_len: int, out: Path) -> list[str]:
    recipe, extra = PROVIDERS[name]
    cmd = [sys.executable, str(recipe), *extra, "--data", *args.data, "--seq-len", str(seq_len),
           "--steps", str(args.steps), "--log-every", "1", "--save-every", "0", "--warmup", "2", "--out", str(out)]
    if args.model:
        cmd += ["--model", args.model]
    scaling = rope_scaling(args)
    if scaling:
        cmd += ["--rope-scaling", scaling]
    if name == "longlora":
        cmd += [f"--attention-opt=group={args.group}"]
    return cmd


def rope_scaling(args) -> str | None:
    """--rope-scaling as given; "auto": linear:4 for the embedded SmolLM2 (8k positions), none for others."""
    if args.rope_scaling == "auto":
        return None if args.model else "linear:4"
    return None if args.rope_scaling == "none" else args.rope_scaling


def run_provider(name: str, args, seq_len: int, workdir: Path) -> dict:
    out = workdir / f"{name}-{seq_len}"
    res = subprocess.run(command(name, args, seq_len, out), capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        return {"provider": name, "seq_len": seq_len, "error": failure(res.stderr)}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    times = sorted(r["step_s"] for r in log if r["step"] > args.skip)
    peaks = [r["peak_mem_gib"] for r in log if "peak_mem_gib" in r]
    return {"provider": name, "seq_len": seq_len, "median_ms": 1000 * statistics.median(times),
            "p20_ms": 1000 * times[int(0.2 * (len(times) - 1))], "p80_ms": 1000 * times[int(0.8 * (len(times) - 1))],
            "peak_gib": max(peaks) if peaks else None, "loss": log[-1]["loss"], "steps": len(times)}


def failure(stderr: str) -> str:
    """Why a recipe run failed, in one line: out of memory, or its last error line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if any("OutOfMemoryError" in line or "CUDA out of memory" in line for line in lines):
        import torch

        total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
        return "out of memory" + (f" ({total:.0f} GiB GPU)" if total else "")
    errors = [line for line in lines if "Error" in line or line.startswith("SystemExit")]
    return ((errors or lines or ["exited with an error and no message"])[-1])[:200]


def model_name(args) -> str:
    if args.model and architectures.is_arch(args.model):
        return architectures.label(args.model) + " (random weights)"
    return Path(args.model).name if args.model else DEFAULT_MODEL


def to_rows(results: list[dict], args, env: dict) -> list[dict]:
    rows = []
    for r in results:
        extra = f"model={model_name(args)},group={args.group}{autotune_note()}"
        row = {**env, "bench": "train-step", "provider": r["provider"], "mode": "step", "dtype": "bf16-autocast",
               "batch": 1, "q_len": r["seq_len"], "kv_len": r["seq_len"]}
        if "error" in r:
            rows.append({**row, "extra": f"{extra},error={r['error'].replace(',', ';')}"})
            continue
        rows.append({**row, "extra": f"{extra},peak_gib={r['peak_gib']},steps={r['steps']}",
                     "median_ms": f"{r['median_ms']:.2f}", "p20_ms": f"{r['p20_ms']:.2f}",
                     "p80_ms": f"{r['p80_ms']:.2f}"})
    return rows


def table(results: list[dict]) -> list[dict]:
    s2 = next((r for r in results if r["provider"] == "longlora" and "error" not in r), None)
    body = []
    for r in results:
        if "error" in r:
            body.append({"provider": r["provider"], "step ms": r["error"], "peak GiB": "", "vs S2": "", "loss": ""})
            continue
        body.append({"provider": r["provider"], "step ms": f"{r['median_ms']:.1f}",
                     "peak GiB": f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-",
                     "vs S2": f"{r['median_ms'] / s2['median_ms']:.2f}x" if s2 and r["provider"] != "seer-distill"
                     else "-",
                     "loss": f"{r['loss']:.3f}"})
    return body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", help="HF model folder, .gguf, or a named architecture with random weights "
                                    f"({', '.join(architectures.PREFIX + n for n in architectures.ARCHITECTURES)}) "
                                    "(default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data", nargs="+", required=True, metavar="SOURCE",
                    help="training text: files, directories, globs or hf:NAME")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[32768], metavar="N", help="tokens per training sequence")
    ap.add_argument("--rope-scaling", default="auto",
                    help="RoPE scaling for the longer context; 'auto': linear:4 for the embedded SmolLM2 (8k "
                         "positions), none for other models; 'none': no scaling")
    ap.add_argument("--group", default="0.25", help="S2 group (fraction of the length or tokens)")
    ap.add_argument("--steps", type=int, default=12, help="training steps per provider")
    ap.add_argument("--skip", type=int, default=3, help="first steps left out of the median")
    ap.add_argument("--providers", nargs="+", default=[p for p in PROVIDERS if p != "seer-distill"],
                    choices=list(PROVIDERS), metavar="NAME",
                    help=f"steps to time, one or more of {', '.join(PROVIDERS)} (default: all but seer-distill)")
    ap.add_argument("--results", default=str(RESULTS_DIR / "kernels.csv"), help="results CSV to append to")
    ap.add_argument("--no-save", action="store_true", help="print only, do not append to the results file")
    args = ap.parse_args(argv)
    if args.steps <= args.skip:
        ap.error("--steps must exceed --skip")
    if args.model and architectures.is_arch(args.model):
        try:
            architectures.parse(args.model)
        except Exception as exc:  # noqa: BLE001  (a ConfigError naming the architectures)
            ap.error(str(exc))
    env = environment()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.seq_len:
            for name in args.providers:
                r = run_provider(name, args, n, Path(tmp))
                print(json.dumps(r), flush=True)
                results.append(r)
                if not args.no_save:
                    append_rows(to_rows([r], args, env), args.results)
    for n in args.seq_len:
        here = [r for r in results if r["seq_len"] == n]
        print(f"\ntraining step, {model_name(args)}, {n} tokens, batch 1, RoPE {rope_scaling(args) or 'as trained'}; "
              "LongLoRA: LoRA r=8 + embeddings and norms, gradient checkpointing, bf16 autocast; seer-distill: "
              f"frozen bf16 model, gates trained; {env['gpu']}")
        print_table(table(here), ["provider", "step ms", "peak GiB", "vs S2", "loss"])
    if not args.no_save:
        print(f"appended {len(results)} rows to {args.results}")
    return 0 if any("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
