#!/usr/bin/env python
"""Host-side cost of one attention call (microseconds of CPU per call, GPU not awaited).

Decode-sized calls do little GPU work, so eager decoding speed is set by what the host spends
per call. This prints that cost for attn_patch's decode path and for SDPA, to tell launch
overhead from kernel time (bench_kernels.py's ``cudagraph`` rows give the kernel time).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host


def main(argv=None):
    from attn_patch.evals.common import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--kv-len", type=int, default=4096, help="KV-cache length of the decode call")
    ap.add_argument("--heads", type=int, nargs=2, default=[9, 3], metavar=("Q", "KV"),
                    help="query heads and key/value heads")
    ap.add_argument("--head-dim", type=int, default=64, help="head dimension")
    args = ap.parse_args(argv)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attn_patch.kernels import flash

    hq, hkv = args.heads
    q = torch.randn(1, 1, hq, args.head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, args.kv_len, hkv, args.head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn_like(k)
    def two_launches():
        flash.DECODE_MERGE = "kernel"
        try:
            return flash.flash_attention(q, k, v)
        finally:
            flash.DECODE_MERGE = "auto"

    rows = {
        "attn_patch decode (whole call)": lambda: flash.flash_attention(q, k, v),
        "attn_patch decode, merge launch": two_launches,
        "attn_patch decode, one split": lambda: flash.flash_attention(q, k, v, num_splits=1),
        "torch.empty x2": lambda: (torch.empty(1, 1, hq, 64, device="cuda"), torch.empty(1, hq, 1, device="cuda")),
    }
    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        rows[name] = run
    with torch.no_grad():
        for name, fn in rows.items():
            print(f"{name:34s} {per_call_us(fn):7.1f} us of host time per call")


if __name__ == "__main__":
    main()
