"""Block-sparse attention benchmark (SeerAttention's prefill): attn_patch's block-sparse kernel at a
given block density against dense baselines and FlexAttention with the same block mask.

Block selections are random per (head, query-block row) at the requested density over the causal
triangle, made by the same selection code the gate uses (sink and diagonal blocks always kept), so
the achieved density is reported next to the requested one. Providers, all on the same tensors:
``sparse`` (ours, block-sparse), ``dense`` (ours, fused dense), ``sdpa-flash`` and ``sdpa-cudnn``
(dense causal, backend pinned), ``flex`` (compiled FlexAttention with the same block mask), and
``gate`` (the SeerGate forward plus block selection for this shape: its own cost) and
``ground-truth`` (the training target pass: dense output plus block maxima). Rows go to
results/kernels.csv with bench = "sparse".
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ..benchmarking import RESULTS_DIR, append_rows, environment, print_table, time_cuda
from ..kernels import attention_flops
from .common import script_main

PROVIDERS = ["sparse", "dense", "sdpa-flash", "sdpa-cudnn", "flex", "gate", "ground-truth"]


def random_selection(b, h, n_q_blocks, n_k_blocks, density, device, generator=None):
    from ..seer import select_blocks
    from ..seer.gate import block_causal_mask

    scores = torch.rand(b, h, n_q_blocks, n_k_blocks, device=device, generator=generator)
    scores = scores.masked_fill(~block_causal_mask(n_q_blocks, n_k_blocks, device=device), 0.0)
    return select_blocks(scores, density=density)


def flex_block_mask(indices, counts, block_size):
    """FlexAttention's BlockMask for exactly our selection, built from the block lists (no N x N
    mask is ever made): blocks below the diagonal are full (no mask_mod work), the diagonal block is
    partial with the causal mask_mod. Assumes the diagonal is selected (select_blocks keeps it)."""
    from torch.nn.attention.flex_attention import BlockMask

    b, h, nq, width = indices.shape
    rows = torch.arange(nq, device=indices.device)
    valid = torch.arange(width, device=indices.device) < counts[..., None]
    below = valid & (indices < rows[:, None])
    full_counts = below.sum(-1).to(torch.int32)
    full_idx = torch.where(below, indices, nq).sort(-1).values.clamp(max=nq - 1).to(torch.int32)
    if width < nq:
        full_idx = torch.cat([full_idx, full_idx.new_zeros(b, h, nq, nq - width)], -1)
    diag_counts = torch.ones(b, h, nq, dtype=torch.int32, device=indices.device)
    diag_idx = torch.zeros(b, h, nq, nq, dtype=torch.int32, device=indices.device)
    diag_idx[..., 0] = rows.to(torch.int32)

    def causal(b_, h_, qi, ki):
        return ki <= qi

    return BlockMask.from_kv_blocks(diag_counts, diag_idx, full_counts, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=causal)


def _flex(q, k, v, indices, counts, block_size):
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mask = flex_block_mask(indices, counts, block_size)
    options = {"BLOCK_M": block_size, "BLOCK_N": block_size} if block_size < 128 else None
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda: fn(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options)


def bench(n, density, block_size, heads, d, dtype, providers, env, seed=0):
    from ..kernels.block_sparse import block_sparse_attention
    from ..kernels.flash import flash_attention
    from ..seer import SeerGate, achieved_density, select_blocks

    hq, hkv = heads
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, n, hq, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(1, n, hkv, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    v = torch.randn(1, n, hkv, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    nb = -(-n // block_size)
    idx, cnt = random_selection(1, hq, nb, nb, density, "cuda", g)
    got = float(achieved_density(cnt, nb).mean())
    rows = []
    for provider in providers:
        try:
            if provider == "sparse":
                fn = lambda: block_sparse_attention(q, k, v, idx, cnt, block_size=block_size)  # noqa: E731
            elif provider == "dense":
                fn = lambda: flash_attention(q, k, v, decode=False)  # noqa: E731
            elif provider in ("sdpa-flash", "sdpa-cudnn"):
                from torch.nn.attention import SDPBackend, sdpa_kernel

                backend = SDPBackend.FLASH_ATTENTION if provider == "sdpa-flash" else SDPBackend.CUDNN_ATTENTION

                def fn(backend=backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            elif provider == "flex":
                fn = _flex(q, k, v, idx, cnt, block_size)
            elif provider == "gate":
                gate = SeerGate(hq, hkv, d, block_size=block_size).to("cuda", dtype)

                def fn(gate=gate):
                    return select_blocks(gate(q, k), density=density)
            elif provider == "ground-truth":  # distillation target: dense output + block maxima
                from ..kernels.seer_gt import attention_with_block_max

                fn = lambda: attention_with_block_max(q, k, v, block_size=block_size)  # noqa: E731
            else:
                raise ValueError(provider)
            with torch.no_grad():
                out = fn()
                if provider == "flex":  # same selection, same numbers
                    ours = block_sparse_attention(q, k, v, idx, cnt, block_size=block_size)[0].float()
                    err = (out.float() - ours).norm() / ours.norm()
                    print(f"# flex vs sparse output, relative L2: {float(err):.2e}", flush=True)
                p50, p20, p80 = time_cuda(fn)
        except Exception as exc:  # noqa: BLE001  (a baseline that cannot run is reported, not fatal)
            print(f"# {provider} N={n} density={density}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            continue
        work = attention_flops(1, hq, n, n, d, True) * (got if provider in ("sparse", "flex") else 1.0)
        rows.append(dict(env, bench="sparse", provider=provider, mode="fwd", dtype=str(dtype).replace("torch.", ""),
                         batch=1, heads_q=hq, heads_kv=hkv, q_len=n, kv_len=n, head_dim=d, causal=True,
                         extra=f"density={density},achieved={got:.3f},block={block_size}",
                         median_ms=round(p50, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                         tflops="" if provider in ("gate", "ground-truth") else round(work / (p50 * 1e-3) / 1e12, 1)))
        print(f"# {provider:10s} N={n} density {density} (achieved {got:.3f}) block {block_size}: {p50:.3f} ms",
              flush=True)
    return rows


def add_arguments(ap) -> None:
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("Q", "KV"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--out", default=str(RESULTS_DIR / "kernels.csv"), help="results CSV to append to")
    ap.add_argument("--no-save", action="store_true")


def run(args) -> int:
    if not torch.cuda.is_available():
        sys.exit("bench sparse needs a CUDA GPU")
    env = environment()
    dtype = getattr(torch, args.dtype)
    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}")
    rows = []
    for n in args.lengths:
        for bs in args.block_sizes:
            for density in args.densities:
                rows += bench(n, density, bs, tuple(args.heads), args.head_dim, dtype, args.providers, env)
                torch.cuda.empty_cache()
    print_table(rows, ["provider", "q_len", "extra", "median_ms", "tflops"])
    keyed = {(r["q_len"], r["extra"], r["provider"]): float(r["median_ms"]) for r in rows}
    print("\n# sparse speed-up (baseline time / sparse time) and gate cost (gate / dense time)")
    for (n, extra, prov), ms in sorted(keyed.items()):
        if prov != "sparse":
            continue
        parts = [f"{b} {keyed[(n, extra, b)] / ms:.2f}x" for b in ("dense", "sdpa-flash", "sdpa-cudnn", "flex")
                 if (n, extra, b) in keyed]
        if (n, extra, "gate") in keyed and (n, extra, "dense") in keyed:
            parts.append(f"gate {100 * keyed[(n, extra, 'gate')] / keyed[(n, extra, 'dense')]:.1f}% of dense")
        print(f"N={n} {extra}: " + "  ".join(parts))
    if not args.no_save and rows:
        print(f"# appended {len(rows)} rows to {append_rows(rows, args.out)}")
    return 0


def main(argv=None) -> int:
    return script_main(add_arguments, run, __doc__, argv, prog="bench_sparse")


if __name__ == "__main__":
    sys.exit(main())
