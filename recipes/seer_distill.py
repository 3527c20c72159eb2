"""SeerAttention gate distillation: train the per-layer gates of a frozen model to predict where its
attention goes.

    accelerate launch --config_file recipes/configs/single_gpu.yaml recipes/seer_distill.py \\
        --data ../shared/data/books/moby_dick.txt ../shared/data/books/jack_sheppard.txt \\
        --seq-len 8192 --steps 400 --out runs/seer-smollm2

    # two GPUs, data parallel (the gates are small: DDP, every rank holds the frozen model)
    accelerate launch --config_file recipes/configs/ddp_2gpu.yaml recipes/seer_distill.py ...

The model is patched with ``attn_patch.apply(model, "seer", distill=True)``: each layer computes the
exact dense attention (the teacher, on the fused ground-truth kernel on GPU) together with the
ground truth of the block distribution (per query block and key block, the largest attention
probability, max-pooled over the query block's rows and normalised per row), and the gate's
block softmax is trained against it with KL(ground truth || gate), summed over layers. The base
model is frozen and runs without building an autograd graph; only the gates train.

Text comes from local files / directories / globs or ``hf:NAME[:CONFIG][@SPLIT]`` (``datasets``),
is tokenised, joined with EOS between documents, and cut into windows of exactly ``--seq-len``
tokens. Each micro-batch takes the next windows of a seeded per-epoch permutation, ranks taking
disjoint ones, so ``--resume`` continues with exactly the batches it would have seen.

Output (``--out``): ``gates.safetensors`` + ``config.json`` (load with
``attn_patch.apply(model, "seer", gates=OUT)``), ``log.jsonl`` (one line per logged step),
``checkpoint/`` (gates, optimizer, scheduler, step) every ``--save-every`` steps and at the end, and
``calibration.json`` (``--calibrate-windows``, default 8: per layer the loss sparse attention adds,
per head the attention mass it keeps, measured on training windows spread over the text), which
``apply(model, "seer", density=...)`` uses to give each layer and head its own density.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from attn_patch.training import (HelpFormatter, add_data_arguments, finish_run, lr_lambda,  # noqa: E402
                                 run_steps, spread_windows, start_run, token_windows)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_arguments(ap)
    ap.add_argument("--rope-scaling", help="RoPE scaling while training (linear:4, yarn:4, ...)")
    ap.add_argument("--seq-len", type=int, default=8192, help="tokens per training sequence")
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per process")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the gates (AdamW)")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    ap.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0: no clipping)")
    ap.add_argument("--block-size", type=int, default=64, choices=[16, 32, 64, 128], help="tokens per gate block")
    ap.add_argument("--gate-dim", type=int, help="gate width (needs --q-proj unless equal to the head dim)")
    ap.add_argument("--q-proj", action="store_true", help="project pooled queries too")
    ap.add_argument("--k-proj-per", default="head", choices=["head", "group"],
                    help="one key projection per query head, or per KV head (group)")
    ap.add_argument("--selection", default="head", choices=["head", "group"], help="stored default selection")
    ap.add_argument("--init-gates", help="start from these gates instead of fresh ones")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="frozen model dtype (default: bfloat16 on GPU, float32 on CPU); gates train in fp32")
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved gates")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    ap.add_argument("--stop-at", type=int, help="checkpoint and stop after this step (a time-sliced job; resume "
                                                  "later with --resume and the same --steps)")
    ap.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    ap.add_argument("--calibrate-windows", type=int, default=8,
                    help="after training, calibrate the gates for allocation='calibrated' on this many training "
                         "windows spread over the text (1 + 12 x layers forward passes each); 0: skip")
    ap.add_argument("--seed", type=int, default=0, help="seed for the gate initialisation and the window order")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    import attn_patch
    from attn_patch.evals.common import load_model
    from attn_patch.seer import distill_losses, gates_of, model_info
    from attn_patch.seer import weights as W

    accelerator, docs = start_run(args)
    out = Path(args.out)
    device = accelerator.device
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model, tokenizer = load_model(args.model, device=str(device), dtype=dtype, rope_scaling=args.rope_scaling)
    for p in model.parameters():
        p.requires_grad_(False)
    gate_opts = dict(block_size=args.block_size, k_proj_per=args.k_proj_per, selection=args.selection,
                     q_proj=args.q_proj)
    if args.gate_dim is not None:  # 0 or less reaches the gate's check instead of meaning 'unset'
        gate_opts["gate_dim"] = args.gate_dim
    attn_patch.apply(model, "seer", distill=True, gates="untrained", **gate_opts)
    gates = gates_of(model)
    if args.init_gates:
        meta, tensors = W.read_gates(args.init_gates)
        W.check_model_info(meta, model_info(model), args.init_gates)
        W.load_state(gates, tensors, args.init_gates)
    params = [p for g in gates for p in g.parameters()]
    for p in params:
        p.requires_grad_(True)
    windows = token_windows(tokenizer, docs, args.seq_len)
    n_params = sum(p.numel() for p in params)
    accelerator.print(f"{len(docs)} documents -> {windows.shape[0]} windows of {args.seq_len} tokens; "
                      f"{len(gates)} gates, {n_params / 1e6:.2f} M trainable parameters; "
                      f"{accelerator.num_processes} process(es)")

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps, args.min_lr_ratio))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    base = accelerator.unwrap_model(model)

    ckpt = out / "checkpoint"
    start = 0
    if args.resume:
        if not (ckpt / "trainer_state.pt").is_file():
            raise SystemExit(f"--resume: no checkpoint at {ckpt}")
        meta, tensors = W.read_gates(ckpt)
        W.load_state(gates_of(base), tensors, ckpt)
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        accelerator.print(f"resumed from {ckpt} at step {start}")

    def save(path: Path, step: int, final: dict | None = None) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            training = {"recipe": "recipes/seer_distill.py", "step": step, "seq_len": args.seq_len,
                        "tokens": step * tokens_per_step, "data": [Path(d).name for d in args.data],
                        "lr": args.lr, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                        "processes": accelerator.num_processes, **(final or {})}
            W.save_gates(gates_of(base), path, model_info(base), training,
                         torch.bfloat16 if args.save_dtype == "bfloat16" else torch.float32)
            if path == ckpt:
                torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "args": vars(args)}, ckpt / "trainer_state.pt")
        accelerator.wait_for_everyone()

    tokens_per_step = args.seq_len * args.batch_size * args.grad_accum * accelerator.num_processes
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    def micro_step(ids):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        losses = torch.stack(distill_losses(base))
        n = ids.numel()  # every window has as many tokens, so these are means per window
        return losses.sum(), {"loss": losses.sum() * n, "layer_loss": losses * n, "tokens": n}

    # the frozen model runs as at inference (no dropout); only the gates learn
    final = run_steps(accelerator, args, model=model, optimizer=optimizer, scheduler=scheduler, params=params,
                      windows=windows, start=start, micro_step=micro_step, checkpoint=lambda step: save(ckpt, step),
                      out=out, desc="distill", train_mode=False)
    if final is None:  # --stop-at
        return finish_run(accelerator)
    save(out, args.steps, final)
    accelerator.print(f"saved gates to {out}")
    if args.calibrate_windows > 0:
        if accelerator.is_main_process:
            calibrate_saved(base, out, windows, args.calibrate_windows, [Path(d).name for d in args.data])
            accelerator.print(f"calibrated the gates on {min(args.calibrate_windows, len(windows))} windows")
        accelerator.wait_for_everyone()
    return finish_run(accelerator)

def calibrate_saved(model, out: Path, windows: torch.Tensor, count: int, data: list[str]) -> None:
    """Re-patch the frozen model for inference with the gates just saved and write their calibration
    beside them (windows spread evenly over the training text)."""
    import attn_patch
    from attn_patch.seer import calibrate

    attn_patch.remove(model)
    attn_patch.apply(model, "seer", gates=str(out), allocation="uniform", min_length=0)
    try:
        calibrate(model, spread_windows(windows, count), save=out, source=", ".join(data))
    finally:
        attn_patch.remove(model)


if __name__ == "__main__":
    sys.exit(main())
