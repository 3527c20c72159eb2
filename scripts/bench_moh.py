#!/usr/bin/env python
"""Head-routed (MoH) attention benchmark (same as `attn-patch bench moh`): see attn_patch/evals/bench_moh.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from attn_patch.evals.bench_moh import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
