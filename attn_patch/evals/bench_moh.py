"""Head-routed attention benchmark (the "moh" method's kernel): attention computed only for the
selected (token, head) pairs against our dense kernel computing every head, forward and
forward+backward, at given active-head ratios.

The selection is the shape the MoH router produces: per token, ``shared`` heads always on
(half of the active heads: the norm router's split, ``--shared half``) and a random top-k of the
other heads, ``ratio`` of the query heads in all; ``--shared none`` routes every active head (the
predict router's split). Providers, on the same tensors: ``moh`` (ours, including the compaction of the head mask into
per-head row lists, as the method calls it), ``moh-kernel`` (the kernel alone on ready lists),
``dense`` (our fused dense kernel, every head), ``masked`` (dense then zeroing the unselected heads:
what the reference MoH code computes), ``sdpa-flash`` and ``sdpa-cudnn`` (dense, backend pinned).
``fwdbwd`` times one forward and one backward. Rows go to results/kernels.csv with bench = "moh".
"""
from __future__ import annotations

import sys

import torch

from ..benchmarking import (RESULTS_DIR, add_attention_shape_arguments, append_rows, attention_shape, environment,
                            pinned_sdpa, print_table, time_cuda)
from ..kernels import attention_flops
from .common import script_main

PROVIDERS = ["moh", "moh-kernel", "dense", "masked", "sdpa-flash", "sdpa-cudnn"]


def routed_mask(n: int, heads: int, ratio: float, generator: torch.Generator, half_shared: bool = True
                ) -> torch.Tensor:
    """bool [1, n, heads]: round(ratio * heads) active heads per token, half of them shared (the first
    heads, always on; none without ``half_shared``), the rest a random choice among the routed heads."""
    active = max(1, round(ratio * heads))
    shared = active // 2 if half_shared else 0
    top_k = active - shared
    mask = torch.zeros(1, n, heads, dtype=torch.bool, device="cuda")
    mask[..., :shared] = True
    if top_k:
        scores = torch.rand(1, n, heads - shared, device="cuda", generator=generator)
        pick = scores.topk(top_k, dim=-1).indices + shared
        mask.scatter_(-1, pick, True)
    return mask


def bench(n, ratio, heads, d, dtype, providers, env, mode="fwd", seed=0, shared="half"):
    from ..kernels.flash import flash_attention
    from ..kernels.moh import compact_rows, head_routed_attention

    hq, hkv = heads
    g = torch.Generator(device="cuda").manual_seed(seed)
    grad = mode == "fwdbwd"

    def make(h):
        return torch.randn(1, n, h, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2).requires_grad_(grad)

    q, k, v = make(hq), make(hkv), make(hkv)
    head_mask = routed_mask(n, hq, ratio, g, half_shared=shared == "half")
    active = float(head_mask.float().mean())
    rows_counts = compact_rows(head_mask)
    gate = head_mask.transpose(1, 2)[..., None].to(dtype)
    rows = []
    for provider in providers:
        if provider in ("moh-kernel", "masked") and ratio >= 1.0:  # nothing to skip or zero
            continue
        try:
            if provider == "moh":
                fn = lambda: head_routed_attention(q, k, v, head_mask)[0]  # noqa: E731
            elif provider == "moh-kernel":
                fn = lambda: head_routed_attention(q, k, v, rows=rows_counts[0], counts=rows_counts[1])[0]  # noqa: E731
            elif provider == "dense":
                fn = lambda: flash_attention(q, k, v, decode=False)[0]  # noqa: E731
            elif provider == "masked":
                fn = lambda: flash_attention(q, k, v, decode=False)[0] * gate  # noqa: E731
            elif provider in ("sdpa-flash", "sdpa-cudnn"):
                fn = pinned_sdpa(q, k, v, provider)
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
        share = active if provider in ("moh", "moh-kernel") else 1.0
        work = attention_flops(1, hq, n, n, d, True) * share * (3.5 if grad else 1.0)
        rows.append(dict(env, bench="moh", provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""),
                         batch=1, heads_q=hq, heads_kv=hkv, q_len=n, kv_len=n, head_dim=d, causal=True,
                         extra=f"ratio={ratio:g},active={active:.3f}" + ("" if shared == "half" else ",shared=0"),
                         median_ms=round(p50, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                         tflops=round(work / (p50 * 1e-3) / 1e12, 1)))
        print(f"# {provider:10s} {mode} N={n} ratio {ratio:g}: {p50:.3f} ms", flush=True)
    return rows


def selection(extra: str) -> str:
    """The selection a row timed, from its ``extra``: the ratio, and ``shared=0`` when no head is shared."""
    return ",".join(p for p in extra.split(",") if not p.startswith("active="))


def summary(rows) -> str:
    """Per (mode, N, ratio): ours against our dense kernel (time ratio, the issue's measure)."""
    keyed = {(r["mode"], int(r["q_len"]), selection(r["extra"]), r["provider"]): float(r["median_ms"])
             for r in rows}
    lines = []
    for (mode, n, ratio, prov), ms in sorted(keyed.items()):
        if prov != "moh":
            continue
        dense = next((v for (m2, n2, _, p2), v in keyed.items() if (m2, n2, p2) == (mode, n, "dense")), None)
        parts = [f"{ms:.3f} ms"]
        if dense:
            parts.append(f"{ms / dense:.2f}x the dense kernel's time")
        kern = keyed.get((mode, n, ratio, "moh-kernel"))
        if kern:
            parts.append(f"kernel alone {kern / (dense or kern):.2f}x")
        lines.append(f"{mode} N={n} {ratio}: " + ", ".join(parts))
    return "\n".join(lines)


def add_arguments(ap) -> None:
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768], metavar="N",
                    help="sequence lengths (batch 1)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], metavar="R",
                    help="active query-head ratios")
    add_attention_shape_arguments(ap, PROVIDERS)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"],
                    help="fwd: forward; fwdbwd: one forward and one backward")
    ap.add_argument("--shared", nargs="+", default=["half"], choices=["half", "none"],
                    help="half of the active heads shared (the norm router) and/or none (the predict router)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "kernels.csv"), help="results CSV to append to")
    ap.add_argument("--no-save", action="store_true", help="print only, do not append to the results file")


def run(args) -> int:
    attention_shape(args)  # a bad --arch fails before the GPU check
    if not torch.cuda.is_available():
        sys.exit("bench moh needs a CUDA GPU")
    env = environment()
    dtype = getattr(torch, args.dtype)
    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}")
    rows = []
    for n in args.lengths:
        for mode in args.modes:
            dense_done = False
            for shared in args.shared:
                for ratio in args.ratios:
                    provs = [p for p in args.providers if p in ("moh", "moh-kernel", "masked") or not dense_done]
                    rows += bench(n, ratio, tuple(args.heads), args.head_dim, dtype, provs, env, mode=mode,
                                  shared=shared)
                    dense_done = True
                    torch.cuda.empty_cache()
    print_table(rows, ["provider", "mode", "q_len", "extra", "median_ms", "tflops"])
    print("\n# MoH time relative to our dense kernel (lower is better)")
    print(summary(rows))
    if not args.no_save and rows:
        print(f"# appended {len(rows)} rows to {append_rows(rows, args.out)}")
    return 0


def main(argv=None) -> int:
    return script_main(add_arguments, run, __doc__, argv, prog="bench_moh")


if __name__ == "__main__":
    sys.exit(main())
