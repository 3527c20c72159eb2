#!/usr/bin/env python
"""Passkey retrieval (LongLoRA style): accuracy per context length, original and patched model
(attn_patch.evals.passkey). Writes passkey.json and passkey.md into --out.

    python scripts/eval_passkey.py --lengths 1024 2048 4096 --trials 10 --method sdpa --method flash --out out/passkey
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from attn_patch.evals.passkey import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
