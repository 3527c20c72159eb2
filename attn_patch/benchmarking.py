"""Shared pieces of the benchmark scripts: environment description, timing, the results file."""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
from pathlib import Path

import torch

def _results_dir() -> Path:
    """$ATTN_PATCH_RESULTS, else the checkout's results/ (editable install), else ./results."""
    env = os.environ.get("ATTN_PATCH_RESULTS")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent
    return checkout / "results" if (checkout / "pyproject.toml").is_file() else Path.cwd() / "results"


RESULTS_DIR = _results_dir()
FIELDS = [
    "date", "gpu", "torch", "triton", "transformers", "bench", "provider", "mode", "dtype",
    "batch", "heads_q", "heads_kv", "q_len", "kv_len", "head_dim", "causal", "extra",
    "median_ms", "p20_ms", "p80_ms", "tflops",
]


def environment() -> dict:
    """GPU name and library versions, recorded with every row."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "gpu": gpu,
        "torch": torch.__version__.split("+")[0],
        "triton": triton_version,
        "transformers": transformers.__version__,
    }


def autotune_note() -> str:
    """",autotune=off" for the extra field of a row measured with ATTN_PATCH_AUTOTUNE=0 (our kernels on
    their first launch configuration, not the tuned one users get by default), else ""."""
    return ",autotune=off" if os.environ.get("ATTN_PATCH_AUTOTUNE", "1") == "0" else ""


def time_cuda(fn, warmup_ms: float = 25, rep_ms: float = 200, grad_to_none=None) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn`` with CUDA events (triton.testing.do_bench)."""
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                             quantiles=[0.5, 0.2, 0.8])
    return p50, p20, p80


_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "math": "MATH"}


def sdpa_backend(name: str):
    """torch's SDPBackend for "flash", "cudnn", "efficient" or "math" (also "sdpa-flash", ...)."""
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, _SDPA_BACKENDS[name.removeprefix("sdpa-")])


def pinned_sdpa(q, k, v, provider: str, is_causal: bool = True):
    """A call of SDPA with its backend pinned: provider "sdpa-flash" or "sdpa-cudnn" (GQA enabled)."""
    from torch.nn.attention import sdpa_kernel

    backend = sdpa_backend(provider)

    def run():
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)

    return run


def cuda_graphed(fn, warmup: int = 3):
    """Capture ``fn`` in a CUDA graph and return its replay: GPU time without Python launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def append_rows(rows: list[dict], path: str | os.PathLike) -> Path:
    """Append result rows (dicts with FIELDS keys) to a CSV file, writing the header once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})
    return path


def read_rows(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def print_table(rows: list[dict], columns: list[str]) -> str:
    """Render rows as a fixed-width text table (returned and printed)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text


def add_attention_shape_arguments(ap, providers: list[str]) -> None:
    """The options the attention-kernel benchmarks (bench_moh, bench_s2, bench_sparse) share: the
    head layout (given, or a named architecture's), which providers to time, the tensor dtype. Their
    ``run`` calls :func:`attention_shape` first."""
    from .architectures import ARCHITECTURES

    ap.add_argument("--heads", type=int, nargs=2, metavar=("Q", "KV"),
                    help="query heads and key/value heads (default: 32 8, or --arch's)")
    ap.add_argument("--head-dim", type=int, help="head dimension (default: 128, or --arch's)")
    ap.add_argument("--arch", metavar="NAME",
                    help="take the heads and head dim of a named architecture: "
                         f"{', '.join(ARCHITECTURES)} (the arch: prefix is optional)")
    ap.add_argument("--providers", nargs="+", default=providers, choices=providers, metavar="NAME",
                    help=f"what to time, one or more of {', '.join(providers)} (default: all)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="tensor dtype")


def attention_shape(args) -> tuple[int, int, int]:
    """Fill ``args.heads`` and ``args.head_dim`` from ``--arch`` (or the 32 / 8 heads, d=128 default)
    and return (query heads, KV heads, head dim); giving both --arch and --heads / --head-dim is an error."""
    from . import architectures
    from .errors import ConfigError

    if getattr(args, "arch", None):
        if args.heads is not None or args.head_dim is not None:
            raise ConfigError("--arch sets the heads and the head dim: give --arch or --heads / --head-dim, not both")
        spec = args.arch if architectures.is_arch(args.arch) else architectures.PREFIX + args.arch
        arch, _ = architectures.parse(spec)
        args.heads, args.head_dim = [arch.heads, arch.kv_heads], arch.dim
    args.heads = args.heads or [32, 8]
    args.head_dim = args.head_dim or 128
    return args.heads[0], args.heads[1], args.head_dim
