"""Merge a LongLoRA run (recipes/longlora_train.py) into a standalone transformers model.

    python recipes/longlora_merge.py runs/longlora-smollm2 runs/longlora-smollm2/merged

The base model named in the run's ``attn_patch.json`` (or ``--model``) loads with the run's RoPE
scaling, the PEFT adapter (LoRA + the trained embeddings and norms) is folded into its weights, and
the result is saved with ``save_pretrained`` together with the tokenizer. The saved config carries
the RoPE scaling and the extended ``max_position_embeddings`` (the trained one for dynamic NTK,
which rescales beyond it), so
``AutoModelForCausalLM.from_pretrained(OUT)`` is the extended model, with no attn_patch or PEFT needed.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

RUN_FILE = "attn_patch.json"


def standalone(model):
    """``model`` as a plain transformers model that ``save_pretrained`` accepts.

    A model read from a GGUF file keeps its loader's quantizer even though its weights are
    dequantized floats, and transformers refuses to save it; the same weights are copied into a
    model built from the config without the quantization entry.
    """
    if getattr(model, "hf_quantizer", None) is None:
        return model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = type(model)(config).to(next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.tie_weights()
    return fresh.eval()


def merge(run_dir, out_dir, *, model: str | None = None, device: str = "cpu", dtype: str = "float32",
          save_dtype: str | None = None) -> Path:
    """Write the merged model of ``run_dir`` to ``out_dir`` and return ``out_dir``."""
    import torch
    from peft import PeftModel

    from attn_patch.evals.common import load_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info_path = run_dir / RUN_FILE
    if not info_path.is_file() or not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise SystemExit(f"{run_dir} is not a finished longlora_train.py run (needs {RUN_FILE} and adapter/)")
    info = json.loads(info_path.read_text())
    base, tokenizer = load_model(model or info.get("model"), device=device, dtype=dtype,
                                 rope_scaling=info.get("rope_scaling"))
    merged = standalone(PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload())
    if save_dtype:
        merged = merged.to(getattr(torch, save_dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / RUN_FILE).write_text(json.dumps({**info, "merged_from": str(run_dir)}, indent=2) + "\n")
    print(f"merged {run_dir} into {out_dir} (RoPE {getattr(merged.config, 'rope_parameters', None)}, "
          f"max_position_embeddings {merged.config.max_position_embeddings})")
    return out_dir


def main(argv=None) -> int:
    from attn_patch.evals.common import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("run", help="the --out directory of recipes/longlora_train.py")
    ap.add_argument("out", help="where to write the merged model")
    ap.add_argument("--model", help="the base model, if not the one recorded in the run")
    ap.add_argument("--device", default="cpu", help="where to load and merge (cpu needs no GPU memory)")
    ap.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the saved model (default: float32)")
    args = ap.parse_args(argv)
    merge(args.run, args.out, model=args.model, device=args.device, save_dtype=args.save_dtype)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
    sys.exit(main())
