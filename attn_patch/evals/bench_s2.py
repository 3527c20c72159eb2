"""S2-Attn benchmark (LongLoRA's training attention): attn_patch's shifted-sparse kernel against
dense causal attention, forward and forward+backward.

Providers, on the same tensors: ``s2`` (ours: groups of N * ratio tokens, the last half of the
heads shifted by half a group), ``dense`` (our fused dense kernel, causal), ``sdpa-flash`` and
``sdpa-cudnn`` (dense causal, backend pinned), ``flex`` (compiled FlexAttention with the S2 pattern
as its mask_mod, reading the same bounds). ``fwdbwd`` times one forward and one backward. Rows go
to results/kernels.csv with bench = "s2".
"""
from __future__ import annotations

import sys

import torch

from ..benchmarking import (RESULTS_DIR, add_attention_shape_arguments, append_rows, attention_shape, environment,
                            pinned_sdpa, print_table, time_cuda)
from ..kernels import attention_flops
from .common import script_main

PROVIDERS = ["s2", "dense", "sdpa-flash", "sdpa-cudnn", "flex"]


def _flex(q, k, v, bounds, shift_from):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[2]
    lo = bounds[0, :2].long()  # [2, N]: group start per position, unshifted / shifted

    def s2_mask(b, h, qi, ki):
        cls = (h >= shift_from).long()
        return (ki <= qi) & (ki >= lo[cls, qi])

    mask = create_block_mask(s2_mask, 1, q.shape[1], n, n, device="cuda", _compile=True)
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda: fn(q, k, v, block_mask=mask, enable_gqa=True)


def bench(n, ratio, heads, d, dtype, providers, env, mode="fwd", seed=0):
    from ..kernels.flash import flash_attention
    from ..kernels.s2 import s2_attention, s2_bounds

    hq, hkv = heads
    g = torch.Generator(device="cuda").manual_seed(seed)
    grad = mode == "fwdbwd"
    q = torch.randn(1, n, hq, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2).requires_grad_(grad)
    k = torch.randn(1, n, hkv, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2).requires_grad_(grad)
    v = torch.randn(1, n, hkv, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2).requires_grad_(grad)
    group = max(2, round(n * ratio))
    bounds = s2_bounds(1, n, group, device="cuda")
    shift_from = hq - hq // 2
    # the S2 pattern's share of the causal triangle's (query, key) pairs
    pairs = float((torch.arange(n, device="cuda") - bounds[0, 0] + 1).sum() + (torch.arange(n, device="cuda")
                  - bounds[0, 1] + 1).sum()) / 2
    share = pairs / (n * (n + 1) / 2)
    rows = []
    for provider in providers:
        try:
            if provider == "s2":
                fn = lambda: s2_attention(q, k, v, bounds, shift_from=shift_from)[0]  # noqa: E731
            elif provider == "dense":
                fn = lambda: flash_attention(q, k, v, decode=False)[0]  # noqa: E731
            elif provider in ("sdpa-flash", "sdpa-cudnn"):
                fn = pinned_sdpa(q, k, v, provider)
            elif provider == "flex":
                fn = _flex(q, k, v, bounds, shift_from)
            else:
                raise ValueError(provider)
            if grad:
                do = torch.randn(1, hq, n, d, device="cuda", dtype=dtype, generator=g)

                def step(fn=fn, do=do):
                    fn().backward(do)
                p50, p20, p80 = time_cuda(step, grad_to_none=[q, k, v])
            else:
                with torch.no_grad():
                    p50, p20, p80 = time_cuda(fn)
        except Exception as exc:  # noqa: BLE001  (a baseline that cannot run is reported, not fatal)
            print(f"# {provider} N={n} {mode}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            continue
        work = attention_flops(1, hq, n, n, d, True) * (share if provider in ("s2", "flex") else 1.0)
        work *= 3.5 if grad else 1.0
        rows.append(dict(env, bench="s2", provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""),
                         batch=1, heads_q=hq, heads_kv=hkv, q_len=n, kv_len=n, head_dim=d, causal=True,
                         extra=f"group={group},share={share:.3f}",
                         median_ms=round(p50, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                         tflops=round(work / (p50 * 1e-3) / 1e12, 1)))
        print(f"# {provider:10s} {mode} N={n} group {group}: {p50:.3f} ms", flush=True)
    return rows


def summary(rows) -> str:
    keyed = {(r["mode"], r["q_len"], r["provider"]): float(r["median_ms"]) for r in rows}
    lines = []
    for (mode, n, prov), ms in sorted(keyed.items()):
        if prov != "s2":
            continue
        parts = [f"{b} {keyed[(mode, n, b)] / ms:.2f}x" for b in PROVIDERS[1:] if (mode, n, b) in keyed]
        lines.append(f"{mode} N={n}: s2 {ms:.2f} ms; speed-up vs " + "  ".join(parts))
    return "\n".join(lines)


def add_arguments(ap) -> None:
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768], metavar="N",
                    help="sequence lengths (batch 1)")
    ap.add_argument("--group", type=float, default=0.25, help="group size as a fraction of the length")
    add_attention_shape_arguments(ap, PROVIDERS)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"],
                    help="fwd: forward; fwdbwd: one forward and one backward")
    ap.add_argument("--out", default=str(RESULTS_DIR / "kernels.csv"), help="results CSV to append to")
    ap.add_argument("--no-save", action="store_true", help="print only, do not append to the results file")


def run(args) -> int:
    attention_shape(args)  # a bad --arch fails before the GPU check
    if not torch.cuda.is_available():
        sys.exit("bench s2 needs a CUDA GPU")
    env = environment()
    dtype = getattr(torch, args.dtype)
    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}")
    rows = []
    for n in args.lengths:
        for mode in args.modes:
            rows += bench(n, args.group, tuple(args.heads), args.head_dim, dtype, args.providers, env, mode=mode)
            torch.cuda.empty_cache()
    print_table(rows, ["provider", "mode", "q_len", "extra", "median_ms", "tflops"])
    print("\n# S2 speed-up (baseline time / S2 time)")
    print(summary(rows))
    if not args.no_save and rows:
        print(f"# appended {len(rows)} rows to {append_rows(rows, args.out)}")
    return 0


def main(argv=None) -> int:
    return script_main(add_arguments, run, __doc__, argv, prog="bench_s2")


if __name__ == "__main__":
    sys.exit(main())
