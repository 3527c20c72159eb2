#!/usr/bin/env python
"""Sweep the decode kernel's launch parameters (key block, pipeline stages, programs per SM,
minimum split) under CUDA graphs and print the GPU time of each setting per shape, best first.
The defaults in kernels/flash.py (DECODE_*) come from this sweep."""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from attn_patch.benchmarking import cuda_graphed, time_cuda  # noqa: E402

SHAPES = [(1, 32, 8, 128, 4096), (1, 32, 8, 128, 32768), (16, 32, 8, 128, 32768),
          (1, 9, 3, 64, 32768), (16, 9, 3, 64, 32768)]


def main(argv=None):
    from attn_patch.evals.common import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--top", type=int, default=4, help="settings printed per shape and overall, best first")
    args = ap.parse_args(argv)

    from attn_patch.kernels import flash

    grid = list(itertools.product([64, 128], [2, 3, 4], [2, 4, 8], [256, 512]))
    totals = {g: 0.0 for g in grid}
    for b, hq, hkv, d, tk in SHAPES:
        q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(b, tk, hkv, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn_like(k)
        times = {}
        for g in grid:
            flash.DECODE_BLOCK_N, flash.DECODE_STAGES, flash.DECODE_PROGRAMS_PER_SM, flash.DECODE_MIN_SPLIT = g
            with torch.no_grad():
                times[g] = time_cuda(cuda_graphed(lambda: flash.flash_attention(q, k, v)), rep_ms=50)[0]
        fastest = min(times.values())
        for g, t in times.items():
            totals[g] += t / fastest
        best = sorted(times.items(), key=lambda kv: kv[1])[: args.top]
        print(f"B={b} heads {hq}/{hkv} d={d} kv={tk}: " +
              "  ".join(f"(block {g[0]}, stages {g[1]}, per-SM {g[2]}, min split {g[3]}) {t * 1e3:.1f} us"
                        for g, t in best), flush=True)
    ranked = sorted(totals.items(), key=lambda kv: kv[1])
    print("\nbest over all shapes (sum of time / that shape's best):")
    for g, score in ranked[: args.top]:
        print(f"  block {g[0]}, stages {g[1]}, per-SM {g[2]}, min split {g[3]}: {score:.2f}")


if __name__ == "__main__":
    main()
