#!/usr/bin/env python
"""Training-step benchmark for LongLoRA: the recipe's own step (forward, backward, AdamW) under each
attention, on the same model, data and settings.

    python scripts/bench_train_step.py --data ../shared/data/books/moby_dick.txt \\
        --seq-len 32768 --rope-scaling linear:4 --steps 12

Each provider runs ``recipes/longlora_train.py`` in its own process (so one provider's memory does
not count for the next): ``longlora`` (S2-Attn on our kernel), ``flash`` (our dense kernel),
``sdpa-flash`` and ``sdpa-cudnn`` (transformers' SDPA attention pinned to one torch backend). The
median step time skips the first ``--skip`` steps (compilation, autotuning); peak memory is
``torch.cuda.max_memory_allocated`` over the training loop. Prints a table and appends rows
(bench "train-step") to results/kernels.csv.
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
from attn_patch.benchmarking import RESULTS_DIR, append_rows, environment, print_table  # noqa: E402
from attn_patch.evals.common import HelpFormatter  # noqa: E402

PROVIDERS = {
    "longlora": ["--attention", "longlora"],
    "flash": ["--attention", "flash"],
    "sdpa-flash": ["--attention", "sdpa", "--sdpa-backend", "flash"],
    "sdpa-cudnn": ["--attention", "sdpa", "--sdpa-backend", "cudnn"],
}


def run_provider(name: str, args, workdir: Path) -> dict:
    out = workdir / name
    cmd = [sys.executable, str(ROOT / "recipes" / "longlora_train.py"), *PROVIDERS[name], "--data", *args.data,
           "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--log-every", "1", "--save-every", "0",
           "--warmup", "2", "--out", str(out)]
    if args.model:
        cmd += ["--model", args.model]
    if args.rope_scaling:
        cmd += ["--rope-scaling", args.rope_scaling]
    if name == "longlora":
        cmd += [f"--attention-opt=group={args.group}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        tail = res.stderr.strip().splitlines()[-1:] or ["?"]
        return {"provider": name, "error": tail[0][:200]}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    info = json.loads((out / "attn_patch.json").read_text())["training"]
    times = [r["step_s"] for r in log if r["step"] > args.skip]
    times.sort()
    return {"provider": name, "median_ms": 1000 * statistics.median(times),
            "p20_ms": 1000 * times[int(0.2 * (len(times) - 1))], "p80_ms": 1000 * times[int(0.8 * (len(times) - 1))],
            "peak_gib": info.get("peak_mem_gib"), "loss": info.get("final_loss"), "steps": len(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", help="HF model folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data", nargs="+", required=True, metavar="SOURCE",
                    help="training text: files, directories, globs or hf:NAME")
    ap.add_argument("--seq-len", type=int, default=32768, help="tokens per training sequence")
    ap.add_argument("--rope-scaling", default="linear:4", help="RoPE scaling for the longer context")
    ap.add_argument("--group", default="0.25", help="S2 group (fraction of the length or tokens)")
    ap.add_argument("--steps", type=int, default=12, help="training steps per provider")
    ap.add_argument("--skip", type=int, default=3, help="first steps left out of the median")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS), metavar="NAME",
                    help=f"attentions to time, one or more of {', '.join(PROVIDERS)} (default: all)")
    ap.add_argument("--results", default=str(RESULTS_DIR / "kernels.csv"), help="results CSV to append to")
    ap.add_argument("--no-save", action="store_true", help="print only, do not append to the results file")
    args = ap.parse_args(argv)
    if args.steps <= args.skip:
        ap.error("--steps must exceed --skip")
    env = environment()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.providers:
            r = run_provider(name, args, Path(tmp))
            print(json.dumps(r), flush=True)
            rows.append(r)
    ok = [r for r in rows if "error" not in r]
    s2 = next((r for r in ok if r["provider"] == "longlora"), None)
    model = args.model or "SmolLM2-135M-Instruct"
    table = []
    for r in ok:
        table.append({"provider": r["provider"], "step ms": f"{r['median_ms']:.1f}",
                      "peak GiB": f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-",
                      "S2 speed-up": f"{r['median_ms'] / s2['median_ms']:.2f}x" if s2 else "-",
                      "loss": f"{r['loss']:.3f}" if r["loss"] is not None else "-"})
    print(f"\ntraining step, {model}, {args.seq_len} tokens, batch 1, RoPE {args.rope_scaling}, LoRA r=8 + "
          f"embeddings and norms, gradient checkpointing, bf16 autocast; {env['gpu']}")
    print_table(table, ["provider", "step ms", "peak GiB", "S2 speed-up", "loss"])
    for r in rows:
        if "error" in r:
            print(f"{r['provider']}: failed: {r['error']}")
    if not args.no_save and ok:
        out = [{**env, "bench": "train-step", "provider": r["provider"], "mode": "step", "dtype": "bf16-autocast",
                "batch": 1, "q_len": args.seq_len, "kv_len": args.seq_len,
                "extra": f"model={Path(model).name},group={args.group},peak_gib={r['peak_gib']},steps={r['steps']}",
                "median_ms": f"{r['median_ms']:.2f}", "p20_ms": f"{r['p20_ms']:.2f}", "p80_ms": f"{r['p80_ms']:.2f}"}
               for r in ok]
        print(f"appended {len(out)} rows to {append_rows(out, args.results)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
