#!/usr/bin/env python
"""Calibrate SeerAttention gates for allocation="calibrated": measure, per layer and head, how much of
the exact attention mass top-k selection by the gates keeps at each density, and write it as
calibration.json beside the gates (tied to that gates file by its SHA-256).

    python scripts/calibrate_seer.py --data ../shared/data/books/moby_dick.txt \\
        ../shared/data/books/jack_sheppard.txt ../shared/data/books/tinyshakespeare.txt --windows 8
    # gates you trained: --gates runs/seer-mymodel --model path/to/model

Then ``attn_patch.apply(model, "seer", density=0.1, allocation="calibrated")`` gives each head its own
density with the same mean. Windows are spread evenly over the text (every document is sampled); the
held-out evaluation books are refused.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def parse_args(argv=None):
    from attn_patch.training import HelpFormatter, add_data_arguments

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_arguments(ap)
    ap.add_argument("--gates", help="gate directory (default: the gates shipped for the embedded SmolLM2)")
    ap.add_argument("--seq-len", type=int, default=8192, help="tokens per calibration window")
    ap.add_argument("--windows", type=int, default=8, help="windows, spread evenly over the text")
    ap.add_argument("--rope-scaling", help="RoPE scaling the gates run under (linear:4, yarn:4, ...)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--block-size", type=int, help="only to check against the gates (they fix it)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import attn_patch
    from attn_patch.evals.common import default_device, load_model
    from attn_patch.evals.text import load_texts
    from attn_patch.seer import calibrate, gates_of
    from attn_patch.training import refuse_held_out, spread_windows, token_windows

    docs = load_texts(args.data, text_field=args.text_field)
    refuse_held_out(docs, args.allow_eval_text)
    device = default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model, tokenizer = load_model(args.model, device=device, dtype=dtype, rope_scaling=args.rope_scaling)
    windows = spread_windows(token_windows(tokenizer, docs, args.seq_len), args.windows)
    opts = {"gates": args.gates} if args.gates else {}
    if args.block_size:
        opts["block_size"] = args.block_size
    # the allocation of the run being measured does not matter, and a calibration already beside the gates
    # (perhaps damaged, or of older gates) must not stop a new one from being measured
    attn_patch.apply(model, "seer", allocation="uniform", **opts)
    source = gates_of(model)[0].source
    t0 = time.perf_counter()
    cal = calibrate(model, windows, save=source,
                    source=", ".join(Path(d.name).name for d in docs))
    seconds = time.perf_counter() - t0
    at = cal["densities"].index(0.1) if 0.1 in cal["densities"] else len(cal["densities"]) // 2
    kept = [sum(unit[at] for unit in layer) / len(layer) for layer in cal["kept"]]
    print(json.dumps({"gates": source, "windows": cal["windows"], "tokens": cal["tokens"], "seconds": round(seconds, 1),
                      f"kept_mass_at_{cal['densities'][at]}_per_layer": [round(x, 3) for x in kept]}))
    print(f"wrote {Path(source) / 'calibration.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
