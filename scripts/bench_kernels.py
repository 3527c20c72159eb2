#!/usr/bin/env python
"""Kernel benchmark (same as `attn-patch bench kernels`): see attn_patch/evals/bench_kernels.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from attn_patch.evals.bench_kernels import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
