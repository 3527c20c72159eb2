"""Kernel benchmark: attn_patch's fused attention against pinned baselines.

Baselines run in the same process on the same tensors (transformers' layout: transposed views of
[B, T, H, D]): SDPA pinned to the flash backend, SDPA pinned to cuDNN, and FlexAttention compiled
with a causal block mask. Prints a table and appends rows (GPU, versions, shape, median/p20/p80 ms,
TFLOP/s) to results/kernels.csv, from which the README tables are built
(scripts/readme_tables.py).

    attn-patch bench kernels                  # the default grid (prefill fwd+bwd, decode)
    attn-patch bench kernels --lengths 8192 --modes fwd --providers attn_patch sdpa-cudnn
    python scripts/bench_kernels.py ...       # the same, from a checkout
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ..benchmarking import RESULTS_DIR, append_rows, cuda_graphed, environment, print_table, time_cuda
from ..errors import ConfigError
from ..kernels import attention_flops
from .common import script_main

PROVIDERS = ["attn_patch", "sdpa-flash", "sdpa-cudnn", "flex"]
SHAPES = {"llama": (32, 8, 128), "smollm2": (9, 3, 64)}


def shape_of(name: str) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a --shapes entry: a name in SHAPES or ``arch:NAME``."""
    from ..architectures import is_arch, parse

    if is_arch(name):
        arch, _ = parse(name)
        return arch.heads, arch.kv_heads, arch.dim
    if name not in SHAPES:
        raise ConfigError(f"shape {name!r}: use {', '.join(SHAPES)} or a named architecture (arch:llama-3.1-8b, ...)")
    return SHAPES[name]


def make_inputs(batch, hq, hkv, tq, tk, d, dtype, requires_grad):
    def t(n, h):
        x = torch.randn(batch, n, h, d, device="cuda", dtype=dtype).transpose(1, 2)
        return x.requires_grad_(requires_grad)

    return t(tq, hq), t(tk, hkv), t(tk, hkv)


def provider_fn(name, q, k, v, causal):
    """Return a zero-argument callable computing attention output [B, H, Tq, D]."""
    tq, tk = q.shape[2], k.shape[2]
    if name == "attn_patch":
        from attn_patch.kernels.flash import flash_attention

        return lambda: flash_attention(q, k, v, causal=causal)[0]
    if name in ("sdpa-flash", "sdpa-cudnn"):
        from attn_patch.benchmarking import pinned_sdpa

        # a causal decode row (Tq=1, last position) sees every key: run it unmasked
        return pinned_sdpa(q, k, v, name, is_causal=causal and tq == tk)
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        compiled = _compiled_flex()
        offset = tk - tq

        def causal_mod(b, h, qi, ki):
            return ki <= qi + offset

        block_mask = create_block_mask(causal_mod, None, None, tq, tk, device="cuda") if causal else None
        return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        # one compiled graph per shape and grad mode: lift dynamo's default limit of 8, past which
        # FlexAttention silently drops to its dense eager path
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.accumulated_recompile_limit = 4096
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_one(env, provider, mode, shape_name, batch, tq, tk, dtype, causal, graph=False):
    hq, hkv, d = shape_of(shape_name)
    needs_grad = mode == "bwd"
    q, k, v = make_inputs(batch, hq, hkv, tq, tk, d, dtype, needs_grad)
    try:
        fn = provider_fn(provider, q, k, v, causal)
        out = fn()
    except Exception as exc:  # a baseline may not support a shape; report it instead of dying
        return {"provider": provider, "mode": mode, "error": f"{type(exc).__name__}: {str(exc)[:80]}"}
    flops = attention_flops(batch, hq, tq, tk, d, causal)
    if mode == "fwd":
        with torch.no_grad():
            if graph:
                try:
                    fn = cuda_graphed(fn)
                except Exception as exc:
                    return {"provider": provider, "mode": mode, "error": f"graph capture: {type(exc).__name__}"}
            p50, p20, p80 = time_cuda(fn)
    else:
        do = torch.randn_like(out)
        p50, p20, p80 = time_cuda(lambda: out.backward(do, retain_graph=True), grad_to_none=[q, k, v])
        flops *= 2.5
    row = dict(env, bench="kernel", provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""),
               batch=batch, heads_q=hq, heads_kv=hkv, q_len=tq, kv_len=tk, head_dim=d, causal=causal,
               extra=shape_name + (",cudagraph" if graph else ""), median_ms=round(p50, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
               tflops=round(flops / (p50 * 1e-3) / 1e12, 1))
    del q, k, v, out
    return row


def correctness(shape_name, batch, n, dtype):
    """Our output and gradients against SDPA-flash on fresh random inputs (relative L2 error)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attn_patch.kernels.flash import flash_attention

    hq, hkv, d = shape_of(shape_name)
    q, k, v = make_inputs(batch, hq, hkv, n, n, d, dtype, True)
    o = flash_attention(q, k, v, causal=True)[0]
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, (q, k, v), do)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        r = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    rg = torch.autograd.grad(r, (q, k, v), do)
    errs = [rel_err(o, r)] + [rel_err(a, b) for a, b in zip(g, rg)]
    return dict(zip(["out", "dq", "dk", "dv"], errs))


def add_arguments(ap) -> None:
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768], metavar="N",
                    help="sequence lengths for prefill (q_len = kv_len)")
    ap.add_argument("--decode-lengths", type=int, nargs="+", default=[4096, 16384, 32768], metavar="N",
                    help="KV-cache lengths for the decode benchmark (q_len = 1)")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16], metavar="B",
                    help="batch sizes for the decode benchmark")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), metavar="SHAPE",
                    help="head shapes: llama = 32 q / 8 kv heads, d=128; smollm2 = 9 q / 3 kv heads, d=64; or a "
                         "named architecture's, e.g. arch:qwen2.5-7b (28 q / 4 kv heads, d=128)")
    ap.add_argument("--modes", nargs="+", default=["fwd", "bwd", "decode"], choices=["fwd", "bwd", "decode"],
                    help="fwd: prefill forward; bwd: prefill backward; decode: one query row on a KV cache, "
                         "eager and CUDA-graphed")
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS, metavar="NAME",
                    help=f"what to time, one or more of {', '.join(PROVIDERS)} (default: all)")
    ap.add_argument("--batch", type=int, default=1, help="batch size for prefill")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="tensor dtype")
    ap.add_argument("--non-causal", action="store_true", help="benchmark non-causal prefill instead")
    ap.add_argument("--out", default=str(RESULTS_DIR / "kernels.csv"), help="results CSV to append to")
    ap.add_argument("--no-save", action="store_true", help="print only, do not append to the results file")


def main(argv=None) -> int:
    return script_main(add_arguments, run, __doc__, argv, prog="bench_kernels")


def run(args) -> int:
    for shape in args.shapes:
        shape_of(shape)  # a bad name fails before the GPU check
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU (the Triton kernels do not run compiled on CPU)")
    dtype = getattr(torch, args.dtype)
    causal = not args.non_causal
    env = environment()
    print(f"# {env['gpu']}  torch {env['torch']}  triton {env['triton']}  transformers {env['transformers']}")

    for shape in args.shapes:
        errs = correctness(shape, 2, 1000, dtype)
        print(f"# correctness vs sdpa-flash ({shape}, B=2, N=1000, causal): "
              + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()))

    rows, failures = [], []
    for shape in args.shapes:
        for mode in [m for m in args.modes if m != "decode"]:
            for n in args.lengths:
                for provider in args.providers:
                    row = bench_one(env, provider, mode, shape, args.batch, n, n, dtype, causal)
                    (failures if "error" in row else rows).append(row)
                    _progress(row)
                    torch.cuda.empty_cache()
        if "decode" in args.modes:
            for b in args.decode_batches:
                for n in args.decode_lengths:
                    for provider in args.providers:
                        for graph in (False, True):
                            row = bench_one(env, provider, "fwd", shape, b, 1, n, dtype, True, graph=graph)
                            if "error" not in row:
                                row["mode"] = "decode"
                            (failures if "error" in row else rows).append(row)
                            _progress(row)
                            torch.cuda.empty_cache()

    print_table(rows, ["provider", "mode", "extra", "batch", "q_len", "kv_len", "median_ms", "tflops"])
    _print_speedups(rows)
    for f in failures:
        print(f"# not run: {f['provider']} {f['mode']}: {f['error']}")
    if not args.no_save:
        path = append_rows(rows, args.out)
        print(f"# appended {len(rows)} rows to {path}")
    return 0


def _progress(row):
    if "error" in row:
        print(f"# {row['provider']} {row['mode']}: {row['error']}", flush=True)
    else:
        print(f"# {row['provider']:11s} {row['mode']:6s} {row['extra']:18s} B={row['batch']} q={row['q_len']} "
              f"kv={row['kv_len']}: {row['median_ms']} ms, {row['tflops']} TFLOP/s", flush=True)


def _print_speedups(rows):
    keyed = {}
    for r in rows:
        keyed[(r["mode"], r["extra"], r["batch"], r["q_len"], r["kv_len"], r["provider"])] = r["median_ms"]
    print("\n# attn_patch speed-up (baseline time / ours; > 1 means faster)")
    for (mode, extra, b, tq, tk, prov), ms in sorted(keyed.items()):
        if prov != "attn_patch":
            continue
        parts = []
        for base in PROVIDERS[1:]:
            other = keyed.get((mode, extra, b, tq, tk, base))
            if other:
                parts.append(f"{base} {other / ms:.2f}x")
        print(f"{mode:6s} {extra:18s} B={b} q={tq} kv={tk}: " + "  ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
