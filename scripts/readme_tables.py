#!/usr/bin/env python
"""Build the README's benchmark tables from results/kernels.csv.

Takes, for each GPU, the newest row of every (provider, mode, shape, lengths) and writes Markdown
tables between the ``<!-- results:kernels -->`` markers of README.md (or prints them with --print).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout
from attn_patch.benchmarking import read_rows  # noqa: E402

BASELINES = ["sdpa-flash", "sdpa-cudnn", "flex"]
START, END = "<!-- results:kernels:start -->", "<!-- results:kernels:end -->"


def _latest(rows):
    latest = {}
    for r in rows:  # file order is chronological; later rows win
        key = (r["gpu"], r["provider"], r["mode"], r["extra"], r["batch"], r["q_len"], r["kv_len"], r["dtype"])
        latest[key] = r
    return latest


def _cell(r):
    return f"{float(r['median_ms']):.3f} ms ({float(r['tflops']):.0f})" if r else "-"


def tables(rows) -> str:
    latest = _latest(rows)
    out = []
    for gpu in sorted({k[0] for k in latest}):
        groups = sorted({k[2:] for k in latest if k[0] == gpu and k[1] == "attn_patch"},
                        key=lambda g: (g[0], g[1], int(g[2]), int(g[4])))
        if not groups:
            continue
        r0 = next(v for k, v in latest.items() if k[0] == gpu)
        out.append(f"**{gpu}**, torch {r0['torch']}, triton {r0['triton']}, {r0['dtype']}, median of "
                   "`triton.testing.do_bench` (TFLOP/s in brackets; speed-up = baseline time / attn_patch time)\n")
        out.append("| mode | shape | batch | q / kv | attn_patch | SDPA flash | SDPA cuDNN | Flex | "
                   "vs flash | vs cuDNN | vs Flex |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for mode, extra, batch, q, kv, dtype in groups:
            ours = latest[(gpu, "attn_patch", mode, extra, batch, q, kv, dtype)]
            base = {b: latest.get((gpu, b, mode, extra, batch, q, kv, dtype)) for b in BASELINES}
            speed = [f"{float(base[b]['median_ms']) / float(ours['median_ms']):.2f}x" if base[b] else "-"
                     for b in BASELINES]
            shape = f"{ours['heads_q']}/{ours['heads_kv']} heads, d={ours['head_dim']}"
            label = extra.split(",", 1)[1] if "," in extra else ""
            out.append(f"| {mode}{' (' + label + ')' if label else ''} | {shape} | {batch} | {q} / {kv} | "
                       f"{_cell(ours)} | " + " | ".join(_cell(base[b]) for b in BASELINES) + " | "
                       + " | ".join(speed) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", default=str(ROOT / "results" / "kernels.csv"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--print", action="store_true", help="print the tables instead of editing the README")
    args = ap.parse_args(argv)
    text = tables(read_rows(args.results))
    if args.print:
        print(text)
        return
    readme = Path(args.readme)
    body = readme.read_text()
    if START not in body or END not in body:
        sys.exit(f"{readme} has no {START} ... {END} markers")
    body = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", body, flags=re.S)
    readme.write_text(body)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
