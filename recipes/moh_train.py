"""Continue-tune a model into Mixture-of-Head attention (MoH): each token uses a subset of the query
heads, only those are computed, and a load-balance loss keeps the routed heads in use.

    # SmolLM2 at 75% of the heads (predict router, per-layer head counts, all weights train)
    accelerate launch --config_file recipes/configs/single_gpu.yaml recipes/moh_train.py \\
        --data ../shared/data/books/moby_dick.txt ../shared/data/books/jack_sheppard.txt \\
        --active 0.75 --allocate --seq-len 4096 --steps 300 --out runs/moh75

    # the dense model fine-tuned on the same tokens (the baseline MoH is judged against)
    accelerate launch ... recipes/moh_train.py --dense --data ... --steps 300 --out runs/dense

    # two GPUs, data parallel
    accelerate launch --config_file recipes/configs/ddp_2gpu.yaml recipes/moh_train.py ...

The model is patched with ``attn_patch.apply(model, "moh", router=..., active=...)`` (``--dense``:
``"flash"``, the same kernel family computing every head). Routers start close to the dense model:
first ``attn_patch.moh.calibrate`` measures the heads on ``--calibrate-windows`` training windows
and makes the most important ones (by what they add to the residual stream) the shared heads, so
the heads a token can drop are the least important ones; the predict router (the default) is
fitted there to predict each head's contribution per token, the norm router has no weights (it
ranks heads by their query norms, scaled per head by calibration), untrained learned routers weight
every computed head by ~1. ``--allocate`` then sets a number of heads per layer (same mean) from
per-layer loss probes. ``--steps 0`` only calibrates and writes the routers. ``--train`` picks what
learns: ``all`` (default), ``attention`` (the attention modules: projections and routers) or
``routers`` (learned routers only). The loss is the next-token NLL (chunked, so the [tokens,
vocab] logits never exist at once), plus ``--distill`` times the KL divergence from the untouched
dense model's next-token distribution (off by default; the teacher is a frozen copy taken before
patching), plus ``attn_patch.aux_loss(model)``, the load-balance loss (weight ``--balance-weight``,
default 0.01). Gradient checkpointing, fp32 weights with bf16 autocast
on GPU, AdamW (0.9, 0.95), warmup then cosine (or constant).

Text comes from local files / directories / globs or ``hf:NAME[:CONFIG][@SPLIT]`` (``datasets``),
packed with EOS between documents into windows of ``--seq-len`` tokens; the window order is a seeded
permutation with ranks taking disjoint windows, so ``--resume`` continues exactly.

Output (``--out``): ``model/`` (the tuned weights as a standalone transformers model + tokenizer),
``routers/`` (router config, head order, scales and router weights: ``attn_patch.apply(model, "moh",
routers=OUT/routers)`` on ``model/`` is the MoH model), ``attn_patch.json`` (settings and training
summary), ``log.jsonl`` (NLL, load-balance loss, learning rate, tokens, step time, peak memory, and
the head utilisation of the last batch), ``checkpoint/`` (trainable weights, optimizer, scheduler).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from attn_patch.training import (HelpFormatter, add_data_arguments, add_loop_arguments,  # noqa: E402
                                 chunked_distill_loss, chunked_lm_loss, enable_checkpointing, finish_run, lr_lambda,
                                 run_steps, start_run, token_windows)

RUN_FILE = "attn_patch.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_arguments(ap)
    ap.add_argument("--dense", action="store_true", help="train the dense model instead (method 'flash'): the "
                                                         "baseline with the same data, tokens and schedule")
    ap.add_argument("--router", choices=["predict", "norm", "learned"],
                    help="predict (default): fitted by calibration to each head's contribution, no shared heads "
                         "unless --shared; norm: parameter-free (MoH-LLaMA3); learned: the paper's")
    ap.add_argument("--active", type=float, help="fraction of the query heads per token (default 0.75)")
    ap.add_argument("--shared", type=int, help="always-on heads (default: half the active heads; none with "
                                                "--router predict)")
    ap.add_argument("--top-k", type=int, help="routed heads per token (default: active minus shared)")
    ap.add_argument("--allocate", action="store_true",
                    help="after calibration, give each layer its own number of heads with --active of them on "
                         "average, from per-layer loss probes on the calibration windows (attn_patch.moh.allocate); "
                         "--top-k is then the routed picks per layer (default 1; with --router predict every kept "
                         "head is routed)")
    ap.add_argument("--balance-weight", type=float, default=0.01, help="weight of the load-balance loss")
    ap.add_argument("--train", default="all", choices=["all", "attention", "routers"],
                    help="parameters that learn (routers: learned routers only)")
    ap.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence")
    ap.add_argument("--router-lr", type=float, help="learning rate of the router weights (default: 10x --lr for "
                                                    "learned routers, --lr for predict routers)")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="weight of a KL(original dense model || trained model) term added to the NLL per token "
                         "(0: off); the untouched model is the teacher, so the run learns the text without "
                         "forgetting what the dropped heads did")
    ap.add_argument("--calibrate-windows", type=int, default=4,
                    help="training windows that calibrate() measures the heads on before training (which heads are "
                         "shared, the norm router's per-head scales); 0: the first heads are shared, unit scales")
    ap.add_argument("--no-save-model", action="store_true", help="skip OUT/model (e.g. --train routers)")
    add_loop_arguments(ap, lr=5e-5, schedule="cosine")
    return ap.parse_args(argv)


class CausalLMLoss(torch.nn.Module):
    """The model and a chunked next-token loss in one module, so DDP sees one forward; returns
    (summed NLL, summed KL to the teacher (0 without one), predicted tokens, load-balance loss). The
    frozen teacher is held outside the module tree, so DDP and the optimizer never see it."""

    def __init__(self, model, chunk: int, moh: bool, teacher=None):
        super().__init__()
        self.model, self.chunk, self.moh = model, chunk, moh
        object.__setattr__(self, "teacher", teacher)

    def forward(self, input_ids):
        import attn_patch

        hidden = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        if self.teacher is None:
            nll, count = chunked_lm_loss(hidden, head, input_ids, self.chunk)
            kl = hidden.new_zeros((), dtype=torch.float32)
        else:
            with torch.no_grad():
                t_hidden = self.teacher.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
            nll, kl, count = chunked_distill_loss(hidden, head, t_hidden, self.teacher.get_output_embeddings(),
                                                  input_ids, self.chunk)
        aux = attn_patch.aux_loss(self.model) if self.moh else hidden.new_zeros(())
        return nll, kl, count, aux


def trainable(model, what: str, moh: bool) -> list[tuple[str, torch.nn.Parameter]]:
    from attn_patch.families import attention_modules

    if what == "all":
        chosen = list(model.named_parameters())
    else:
        keep = set()
        for m in attention_modules(model):
            target = getattr(m, "moh_router", None) if what == "routers" else m
            if target is not None:
                keep |= {id(p) for p in target.parameters()}
        chosen = [(n, p) for n, p in model.named_parameters() if id(p) in keep]
    if not chosen:
        raise SystemExit(f"--train {what}: nothing to train" + (" (the norm router has no weights; use "
                                                                 "--router learned or --train attention)" if moh else ""))
    return chosen


def _standalone():
    spec = importlib.util.spec_from_file_location("longlora_merge", Path(__file__).with_name("longlora_merge.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.standalone


def main(argv=None) -> int:
    args = parse_args(argv)
    from safetensors.torch import load_file, save_file

    import attn_patch
    from attn_patch.evals.common import load_model
    from attn_patch.moh import save_routers

    if args.dense and (args.router is not None or args.active or args.shared is not None or args.top_k is not None
                       or args.allocate):
        raise SystemExit("--dense trains the dense model: drop the MoH options")
    if not args.dense:
        args.router = args.router or "predict"
    if args.router == "predict" and not args.calibrate_windows:
        raise SystemExit("--router predict (the default) is fitted by calibration: keep --calibrate-windows above 0, "
                         "or use --router norm")
    if args.allocate and (args.shared is not None or not args.calibrate_windows):
        raise SystemExit("--allocate sets every layer's shared heads itself from calibration: drop --shared and "
                         "keep --calibrate-windows above 0")
    cuda = torch.cuda.is_available()
    precision = args.mixed_precision or ("bf16" if cuda else "no")
    accelerator, docs = start_run(args, precision)
    out = Path(args.out)
    device = accelerator.device
    model, tokenizer = load_model(args.model, device=str(device), dtype="float32")
    model.config.use_cache = False
    options = {}
    if args.dense:
        method = "flash"
    else:
        method = "moh"
        options = {"router": args.router, "balance_weight": args.balance_weight}
        split = (("active", args.active),) if args.allocate else (
            ("active", args.active), ("shared", args.shared), ("top_k", args.top_k))
        options.update({k: v for k, v in split if v is not None})
        if args.router == "learned":
            options["routers"] = "untrained"
    ckpt = out / "checkpoint"
    windows = token_windows(tokenizer, docs, args.seq_len)
    teacher = None
    if args.distill:
        import copy

        teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the untouched model, before patching
    if args.resume and method == "moh":  # the head order and scales the run started with
        kept = {k: v for k, v in options.items() if not (args.allocate and k in ("active", "top_k"))}
        attn_patch.apply(model, method, **{**kept, "routers": str(ckpt / "routers")})  # counts from the routers
    else:
        attn_patch.apply(model, method, **options)
        if method == "moh" and args.calibrate_windows:
            from attn_patch.moh import calibrate

            n_cal = min(args.calibrate_windows, windows.shape[0])
            cal = calibrate(model, [windows[i:i + 1] for i in range(n_cal)],
                                   source=f"{n_cal} training windows of {args.seq_len} tokens")
            accelerator.print(f"calibrated on {cal['tokens']} tokens: shared heads per layer "
                              f"{[r['shared_heads'] for r in attn_patch.stats(model)['layers']][:4]}...")
            if args.allocate:
                from attn_patch.moh import allocate

                with accelerator.autocast():  # L x (heads - 1) forwards: in the training precision, not fp32
                    got = allocate(model, [windows[i:i + 1] for i in range(n_cal)], active=args.active,
                                   top_k=args.top_k)
                if accelerator.num_processes > 1:  # every rank must route the same heads (shapes of learned routers)
                    from accelerate.utils import broadcast_object_list

                    from attn_patch.moh import set_layer_heads

                    got["heads"] = broadcast_object_list([got["heads"]])[0]
                    set_layer_heads(model, got["heads"], args.top_k)
                accelerator.print(f"allocated {sum(got['heads'])} heads over {len(got['heads'])} layers: "
                                  f"{got['heads']}")
    for p in model.parameters():
        p.requires_grad_(False)
    named = trainable(model, args.train, not args.dense)
    for _, p in named:
        p.requires_grad_(True)
    if not args.no_gradient_checkpointing:
        enable_checkpointing(model)
    router_params = [p for n, p in named if "moh_router" in n]
    other_params = [p for n, p in named if "moh_router" not in n]
    router_lr = args.router_lr or (10 * args.lr if args.router == "learned" else args.lr)
    groups = [g for g in ({"params": other_params, "lr": args.lr},
                          {"params": router_params, "lr": router_lr}) if g["params"]]
    n_params = sum(p.numel() for _, p in named)
    moh = method == "moh"
    accelerator.print(f"{len(docs)} documents -> {windows.shape[0]} windows of {args.seq_len} tokens; "
                      f"{n_params / 1e6:.2f} M trainable parameters ({args.train}); method {method} {options}; "
                      f"{accelerator.num_processes} process(es)")
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.warmup, args.steps, args.min_lr_ratio, args.schedule))
    wrapper, optimizer, scheduler = accelerator.prepare(CausalLMLoss(model, args.loss_chunk, moh, teacher),
                                                        optimizer, scheduler)
    start = 0
    if args.resume:
        if not (ckpt / "trainer_state.pt").is_file():
            raise SystemExit(f"--resume: no checkpoint at {ckpt}")
        saved = load_file(ckpt / "trainable.safetensors", device=str(device))
        names = {n for n, _ in named}
        if set(saved) != names:
            raise SystemExit(f"--resume: the checkpoint's parameters differ from this run's: "
                             f"{sorted(set(saved) ^ names)[:4]}")
        with torch.no_grad():
            for n, p in named:
                p.copy_(saved[n])
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        accelerator.print(f"resumed from {ckpt} at step {start}")

    tokens_per_step = args.seq_len * args.batch_size * args.grad_accum * accelerator.num_processes
    run_info = {"recipe": "recipes/moh_train.py", "model": args.model, "method": method, "options": options,
                "seq_len": args.seq_len, "train": args.train, "distill": args.distill, "allocate": args.allocate}

    def training_info(step: int, final: dict | None = None) -> dict:
        return {"step": step, "tokens": step * tokens_per_step, "data": [Path(d).name for d in args.data],
                "lr": args.lr, "router_lr": router_lr, "schedule": args.schedule,
                "warmup": args.warmup, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                "processes": accelerator.num_processes, "mixed_precision": precision, **(final or {})}

    def checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach().contiguous() for n, p in named}, str(ckpt / "trainable.safetensors"))
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "args": vars(args)}, ckpt / "trainer_state.pt")
            if moh:
                save_routers(model, ckpt / "routers")
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    def micro_step(ids):
        nll, kl, count, aux = wrapper(ids)
        values = {"loss": nll, "tokens": count, "aux": aux * count}  # aux: logged as its mean per window
        if teacher is not None:
            values["kl"] = kl
        return (nll + args.distill * kl) / count + aux, values

    def log_extra() -> dict:
        if not moh:
            return {}
        st = attn_patch.stats(model, reset=True)
        util = [u for layer in st["layers"] for h, u in enumerate(layer["utilisation"])
                if h not in layer["shared_heads"]]
        return {"active": st["active"],
                "routed_util_min_max": [round(min(util), 4), round(max(util), 4)] if util else None}

    final = run_steps(accelerator, args, model=wrapper, optimizer=optimizer, scheduler=scheduler,
                      params=[p for _, p in named], windows=windows, start=start, micro_step=micro_step,
                      checkpoint=checkpoint, out=out, desc=f"moh ({method})", log_extra=log_extra)
    if final is None:  # --stop-at
        return finish_run(accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {**run_info, "training": training_info(args.steps, final)}
        if moh:
            save_routers(model, out / "routers", training=info["training"])
        attn_patch.remove(model)
        if not args.no_save_model:
            standalone = _standalone()(model)
            standalone.config.use_cache = True
            standalone.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
        (out / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")
        accelerator.print(f"saved {out}")
    return finish_run(accelerator)


if __name__ == "__main__":
    sys.exit(main())
