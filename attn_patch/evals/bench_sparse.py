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

from ..benchmarking import (RESULTS_DIR, add_attention_shape_arguments, append_rows, attention_shape, environment,
                            pinned_sdpa, print_table, time_cuda)
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


def _rope_tables(n, d, device, dtype, theta=500000.0):
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _gate_fn(q, k, block_size, density):
    """What seer runs per layer before the sparse kernel: fused pooling (undoing RoPE), the gate's
    projections and block softmax, top-k selection to index lists."""
    from ..kernels.seer_pool import pool_blocks_fused
    from ..seer import SeerGate
    from ..seer.method import choose_blocks

    hq, hkv, n, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    gate = SeerGate(hq, hkv, d, block_size=block_size, rope_theta=500000.0).to("cuda")
    cos, sin = _rope_tables(n, d, q.device, q.dtype)

    def fn():
        qb = pool_blocks_fused(q, block_size, minmax=False, cos=cos, sin=sin)
        kb = pool_blocks_fused(k, block_size, minmax=True, cos=cos, sin=sin)
        return choose_blocks(gate, qb, kb, 0, kernel=True, density=density)
    return fn


def bench(n, density, block_size, heads, d, dtype, providers, env, seed=0, mode="fwd"):
    from ..kernels.block_sparse import block_sparse_attention
    from ..kernels.flash import flash_attention
    from ..seer import achieved_density

    hq, hkv = heads
    g = torch.Generator(device="cuda").manual_seed(seed)
    grad = mode == "bwd"
    q = torch.randn(1, n, hq, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2).requires_grad_(grad)
    k = torch.randn(1, n, hkv, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2).requires_grad_(grad)
    v = torch.randn(1, n, hkv, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2).requires_grad_(grad)
    nb = -(-n // block_size)
    idx, cnt = random_selection(1, hq, nb, nb, density, "cuda", g)
    got = float(achieved_density(cnt, nb).mean())
    rows = []
    for provider in providers:
        if grad and provider in ("gate", "ground-truth"):
            continue  # forward-only passes
        try:
            if provider == "sparse":
                fn = lambda: block_sparse_attention(q, k, v, idx, cnt, block_size=block_size)[0]  # noqa: E731
            elif provider == "dense":
                fn = lambda: flash_attention(q, k, v, decode=False)[0]  # noqa: E731
            elif provider in ("sdpa-flash", "sdpa-cudnn"):
                fn = pinned_sdpa(q, k, v, provider)
            elif provider == "flex":
                fn = _flex(q, k, v, idx, cnt, block_size)
            elif provider == "gate":
                fn = _gate_fn(q.detach(), k.detach(), block_size, density)
            elif provider == "ground-truth":  # distillation target: dense output + block maxima
                from ..kernels.seer_gt import attention_with_block_max

                fn = lambda: attention_with_block_max(q, k, v, block_size=block_size)  # noqa: E731
            else:
                raise ValueError(provider)
            if grad:
                out = fn()
                do = torch.randn_like(out)

                def step(out=out, do=do):
                    out.backward(do, retain_graph=True)
                p50, p20, p80 = time_cuda(step, grad_to_none=[q, k, v])
            else:
                with torch.no_grad():
                    out = fn()
                    if provider == "flex":  # same selection, same numbers
                        ours = block_sparse_attention(q, k, v, idx, cnt, block_size=block_size)[0].float()
                        err = (out.float() - ours).norm() / ours.norm()
                        print(f"# flex vs sparse output, relative L2: {float(err):.2e}", flush=True)
                    p50, p20, p80 = time_cuda(fn)
        except Exception as exc:  # noqa: BLE001  (a baseline that cannot run is reported, not fatal)
            print(f"# {provider} N={n} density={density} {mode}: {type(exc).__name__}: {str(exc)[:200]}",
                  file=sys.stderr)
            continue
        work = attention_flops(1, hq, n, n, d, True) * (got if provider in ("sparse", "flex") else 1.0)
        work *= 2.5 if grad else 1.0
        rows.append(dict(env, bench="sparse", provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""),
                         batch=1, heads_q=hq, heads_kv=hkv, q_len=n, kv_len=n, head_dim=d, causal=True,
                         extra=f"density={density},achieved={got:.3f},block={block_size}",
                         median_ms=round(p50, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                         tflops="" if provider in ("gate", "ground-truth") else round(work / (p50 * 1e-3) / 1e12, 1)))
        print(f"# {provider:10s} {mode} N={n} density {density} (achieved {got:.3f}) block {block_size}: "
              f"{p50:.3f} ms", flush=True)
    return rows


def summary(rows) -> str:
    keyed = {(r["mode"], r["q_len"], r["extra"], r["provider"]): float(r["median_ms"]) for r in rows}
    fwd_gate = {(n, e): ms for (m, n, e, p), ms in keyed.items() if p == "gate"}
    lines = []
    for (mode, n, extra, prov), ms in sorted(keyed.items()):
        if prov != "sparse":
            continue
        gate = fwd_gate.get((n, extra)) if mode == "fwd" else None
        parts = []
        for b in ("dense", "sdpa-flash", "sdpa-cudnn", "flex"):
            base = keyed.get((mode, n, extra, b))
            if base is None:
                continue
            parts.append(f"{b} {base / ms:.2f}x" + (f" ({base / (ms + gate):.2f}x with gate)" if gate else ""))
        dense = keyed.get((mode, n, extra, "dense"))
        if gate and dense:
            parts.append(f"gate {100 * gate / dense:.1f}% of dense")
        lines.append(f"{mode} N={n} {extra}: " + "  ".join(parts))
    return "\n".join(lines)


def sweep_tiles(n, density, block_size, heads, d, dtype, specs: list[str], seed=0) -> None:
    """Time the block-sparse kernels under other launch settings, print only (the defaults in
    kernels/block_sparse.py come from such sweeps). A spec is KIND:MxNxWxS[:rows]: KIND fwd (times the
    forward) or dq / dkdv (times the backward pass); BLOCK_M x BLOCK_N x warps x stages; ``rows``
    launches tiles-first. Each result is checked against the default settings'."""
    from ..kernels import block_sparse
    from ..kernels.block_sparse import block_sparse_attention

    hq, hkv = heads
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
               for h in (hq, hkv, hkv))
    nb = -(-n // block_size)
    idx, cnt = random_selection(1, hq, nb, nb, density, "cuda", g)
    do = torch.randn_like(q)

    def run(kind):
        if kind == "fwd":
            with torch.no_grad():
                return [block_sparse_attention(q, k, v, idx, cnt, block_size=block_size)[0]]
        out = block_sparse_attention(q, k, v, idx, cnt, block_size=block_size)[0]
        return list(torch.autograd.grad(out, (q, k, v), do))

    want = {kind: run(kind) for kind in ("fwd", "dq")}
    want["dkdv"] = want["dq"]
    for spec in specs:
        kind, _, rest = spec.partition(":")
        tile, _, order = rest.partition(":")
        cfg = (*(int(x) for x in tile.lower().split("x")), order == "rows")
        block_sparse.TILES[(kind, block_size)] = cfg
        try:
            got = run(kind)
            err = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(got, want[kind]))
            if kind == "fwd":
                ms = time_cuda(lambda: run("fwd"))[0]
            else:
                out = block_sparse_attention(q, k, v, idx, cnt, block_size=block_size)[0]
                ms = time_cuda(lambda: out.backward(do, retain_graph=True), grad_to_none=[q, k, v])[0]
            print(f"# {spec:22s} N={n} density {density} block {block_size}: {ms:.3f} ms "
                  f"(rel. diff to default {err:.1e})", flush=True)
        except Exception as exc:  # noqa: BLE001  (a setting that does not compile is reported)
            print(f"# {spec}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        finally:
            del block_sparse.TILES[(kind, block_size)]


def add_arguments(ap) -> None:
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768], metavar="N",
                    help="sequence lengths (batch 1)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.5], metavar="D",
                    help="requested block densities over the causal triangle")
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[64], metavar="B", help="block sizes in tokens")
    add_attention_shape_arguments(ap, PROVIDERS)
    ap.add_argument("--modes", nargs="+", default=["fwd"], choices=["fwd", "bwd"],
                    help="fwd: forward passes; bwd: the backward pass alone (gate / ground truth are forward-only)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "kernels.csv"), help="results CSV to append to")
    ap.add_argument("--no-save", action="store_true", help="print only, do not append to the results file")
    ap.add_argument("--tiles", nargs="+", default=None, metavar="KIND:MxNxWxS[:rows]",
                    help="instead of the benchmark: time the kernels under these launch settings (fwd, dq or dkdv; "
                         "BLOCK_M x BLOCK_N x warps x stages; ':rows' launches tiles-first), print only")


def run(args) -> int:
    attention_shape(args)  # a bad --arch fails before the GPU check
    if not torch.cuda.is_available():
        sys.exit("bench sparse needs a CUDA GPU")
    env = environment()
    dtype = getattr(torch, args.dtype)
    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}")
    if args.tiles:
        for n in args.lengths:
            for bs in args.block_sizes:
                for density in args.densities:
                    sweep_tiles(n, density, bs, tuple(args.heads), args.head_dim, dtype, args.tiles)
        return 0
    rows = []
    for n in args.lengths:
        for bs in args.block_sizes:
            for density in args.densities:
                for mode in args.modes:
                    rows += bench(n, density, bs, tuple(args.heads), args.head_dim, dtype, args.providers, env,
                                  mode=mode)
                    torch.cuda.empty_cache()
    print_table(rows, ["provider", "mode", "q_len", "extra", "median_ms", "tflops"])
    print("\n# sparse speed-up (baseline time / sparse time; 'with gate': baseline / (sparse + gate)),"
          " gate cost as % of dense")
    print(summary(rows))
    if not args.no_save and rows:
        print(f"# appended {len(rows)} rows to {append_rows(rows, args.out)}")
    return 0


def main(argv=None) -> int:
    return script_main(add_arguments, run, __doc__, argv, prog="bench_sparse")


if __name__ == "__main__":
    sys.exit(main())
