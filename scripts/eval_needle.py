#!/usr/bin/env python
"""Needle in a haystack: accuracy per context length x needle depth, original and patched model
(attn_patch.evals.needle). Writes needle.json, needle.md and needle.png (heatmap) into --out.

    python scripts/eval_needle.py --lengths 1024 2048 4096 --depths 0 50 100 --method sdpa --method flash --out out/needle
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from attn_patch.evals.needle import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
