#!/usr/bin/env python
"""Perplexity of the original and patched model per context length (attn_patch.evals.perplexity).

    python scripts/eval_perplexity.py --data ../shared/data/books --lengths 2048 4096 --method sdpa --method flash
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from attn_patch.evals.perplexity import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
