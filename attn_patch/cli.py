"""Command line.

    attn-patch run                         patch a model, check it against the original, time both
    attn-patch eval ppl|needle|passkey     evaluations (attn_patch.evals)
    attn-patch bench kernels|e2e|sparse|s2|moh   benchmarks; rows go to results/kernels.csv
    attn-patch methods                     methods and their options
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .evals.common import HelpFormatter, run_args

# An original paragraph, repeated to the requested length when no text file is given.
BUILTIN_TEXT = (
    "The lighthouse keeper wrote the weather into a ledger every morning: the direction of the wind, "
    "the height of the swell, the colour of the sky over the headland, and the names of the boats that "
    "had passed in the night. Over forty years the ledger grew into eleven volumes. Nobody read them "
    "until a student from the university came looking for a record of storms, and found instead a "
    "history of the village told one sentence at a time: who fished, who left, who came back, and "
    "which winters were long. "
)


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--option takes name=value, got {pair!r}")
        name, raw = pair.split("=", 1)
        try:
            options[name] = json.loads(raw)
        except json.JSONDecodeError:
            options[name] = raw
    return options


def _prompt_ids(tokenizer, text_file: str | None, n_tokens: int) -> torch.Tensor:
    text = Path(text_file).read_text(encoding="utf-8", errors="replace") if text_file else BUILTIN_TEXT
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise SystemExit(f"{text_file} holds no text")
    while ids.numel() < n_tokens:
        ids = torch.cat([ids, ids])
    return ids[:n_tokens][None]


def _timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def cmd_run(args) -> int:
    import attn_patch
    from attn_patch.evals.common import load_model
    from attn_patch.models import check_device

    dtype = getattr(torch, args.dtype)
    device = str(check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    print(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ({args.dtype}, {device}) ...", flush=True)
    model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    ids = _prompt_ids(tokenizer, args.text_file, args.prompt_tokens).to(device)
    options = _parse_options(args.option)
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def prefill_logits():
        return model(ids).logits[0, -1].float()

    with torch.no_grad():
        prefill_logits()  # warm-up: allocator, cuDNN/SDPA selection
        base_logits, base_prefill = _timed(prefill_logits, device)
        base_out, base_gen = _timed(lambda: model.generate(ids, **gen), device)
        with attn_patch.patched(model, args.method, **options):
            prefill_logits()  # warm-up: Triton compilation and autotuning happen here
            logits, prefill = _timed(prefill_logits, device)
            out, gen_time = _timed(lambda: model.generate(ids, **gen), device)

    new = out[0, ids.shape[1]:]
    base_new = base_out[0, ids.shape[1]:]
    agree = int((new == base_new).sum())
    diff = (logits - base_logits).abs().max().item()
    print(f"\nmethod {args.method} {options or ''} on {model.config.model_type}, prompt {ids.shape[1]} tokens")
    print(f"  last-position logits: max |patched - original| = {diff:.3g}")
    print(f"  greedy tokens identical to the original model: {agree}/{len(new)}")
    print(f"  prefill (after a warm-up call): original {base_prefill * 1e3:.1f} ms, patched {prefill * 1e3:.1f} ms")
    print(f"  generate {len(new)} tokens: original {base_gen:.2f} s, patched {gen_time:.2f} s")
    print("  continuation:", repr(tokenizer.decode(new, skip_special_tokens=True)))
    return 0 if agree == len(new) or dtype != torch.float32 else 1


def cmd_methods(args) -> int:
    import attn_patch

    for name, info in attn_patch.methods().items():
        print(f"{name}: {info['summary']}")
        for opt in info["options"]:
            choices = f" one of {opt['choices']}" if opt["choices"] else ""
            print(f"  {opt['name']} ({opt['type']}, default {opt['default']!r}){choices}\n      {opt['help']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attn-patch", description="Fused and sparse attention for transformers.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="patch a model, compare it with the original and time both",
                         description="Load a model (default: the embedded SmolLM2-135M-Instruct), run a prompt "
                                     "and greedy generation with and without the patch, and report agreement "
                                     "and timings.", formatter_class=HelpFormatter)
    run.add_argument("--model", help="a Hugging Face model folder or hub name, a .gguf file, or arch:NAME (a named "
                                     "architecture with random weights, e.g. arch:llama-3.1-8b) (default: embedded "
                                     "SmolLM2)")
    run.add_argument("--method", default="flash", help="attention method (see `attn-patch methods`)")
    run.add_argument("--option", action="append", metavar="NAME=VALUE",
                     help="method option, repeatable (e.g. --option backend=triton)")
    run.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="model dtype; the fused kernels run for bfloat16/float16 on CUDA")
    run.add_argument("--text-file", help="prompt text (default: a built-in paragraph, repeated)")
    run.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens")
    run.add_argument("--new-tokens", type=int, default=24, help="tokens to generate")
    run.set_defaults(func=lambda args: run_args(cmd_run, args, "attn-patch run"))
    methods = sub.add_parser("methods", help="list methods and their options",
                             description="List the attention methods and their options (name, type, default, "
                                         "choices), as `attn_patch.methods()` returns them.",
                             formatter_class=HelpFormatter)
    methods.set_defaults(func=cmd_methods)
    _add_group(sub, "eval", "evaluate methods side by side on the same inputs", EVALS)
    _add_group(sub, "bench", "benchmark kernels or whole models against pinned baselines", BENCHES)
    return parser


# subcommand -> (module in attn_patch.evals, one-line help)
EVALS = {
    "ppl": ("perplexity", "perplexity per context length on local text files or a datasets dataset"),
    "needle": ("needle", "needle in a haystack: accuracy over context lengths x depths, heatmap"),
    "passkey": ("passkey", "passkey retrieval (LongLoRA's test): accuracy per context length"),
}
BENCHES = {
    "kernels": ("bench_kernels", "attention kernels vs SDPA (flash, cuDNN) and FlexAttention"),
    "e2e": ("bench_e2e", "whole-model prefill latency, peak memory and decode speed per method"),
    "sparse": ("bench_sparse", "block-sparse attention at given densities vs dense baselines and FlexAttention"),
    "s2": ("bench_s2", "LongLoRA's shifted-sparse attention (S2-Attn) vs dense baselines and FlexAttention"),
    "moh": ("bench_moh", "head-routed (MoH) attention at given active-head ratios vs our dense kernel and SDPA"),
}


def _add_group(sub, name: str, help_text: str, table: dict) -> None:
    import importlib

    group = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
    inner = group.add_subparsers(dest="task", required=True, metavar="{" + ",".join(table) + "}")
    for task, (module_name, task_help) in table.items():
        module = importlib.import_module(f"attn_patch.evals.{module_name}")
        parser = inner.add_parser(task, help=task_help, description=(module.__doc__ or task_help).strip(),
                                  formatter_class=HelpFormatter)
        module.add_arguments(parser)
        parser.set_defaults(func=_runner(module))


def _runner(module):
    return lambda args: run_args(module.run, args, "attn-patch")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
