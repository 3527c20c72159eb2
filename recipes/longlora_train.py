"""LongLoRA context extension: LoRA on the attention projections plus trainable embeddings and norms,
trained on long packed text with shifted-sparse attention (S2-Attn) and a scaled RoPE.

    # SmolLM2 8k -> 32k: linear position interpolation x4, S2-Attn with groups of 1/4 of the window
    accelerate launch --config_file recipes/configs/single_gpu.yaml recipes/longlora_train.py \\
        --data ../shared/data/books/moby_dick.txt ../shared/data/books/jack_sheppard.txt \\
        --rope-scaling linear:4 --seq-len 32768 --steps 200 --out runs/longlora-smollm2 --merge

    # two GPUs, data parallel (LoRA weights are small: DDP, every rank holds the model)
    accelerate launch --config_file recipes/configs/ddp_2gpu.yaml recipes/longlora_train.py ...

The model loads with the RoPE scaling merged into its config (``--rope-scaling linear:4``,
``yarn:4``, ``theta:1e6:4``... or a JSON object; see ``attn_patch.models.parse_rope_scaling``), is
patched with ``attn_patch.apply(model, ATTENTION)``
(default ``longlora``: S2-Attn while training; ``--attention flash`` trains with dense attention,
``--attention seer`` with a seer model's block-sparse attention, ``--attention sdpa`` unpatched) and
wrapped by PEFT: LoRA (``--lora-r 8 --lora-alpha 16`` on the family's q, k, v, o projections unless
``--lora-targets`` says otherwise) plus full copies of the embeddings and norms as
``modules_to_save`` (tied input/output embeddings stay tied). Gradient checkpointing is on, the
weights are fp32 with bf16 autocast on GPU, the loss is the next-token NLL computed in chunks of
positions so the [tokens, vocab] logits never exist at once.

Text comes from local files / directories / globs or ``hf:NAME[:CONFIG][@SPLIT]`` (``datasets``),
is tokenised, joined with EOS between documents and cut into windows of ``--seq-len`` tokens
(``--doc-mask``: attention does not cross the EOS boundaries inside a window). The window order is
a seeded permutation per epoch with ranks taking disjoint windows, so ``--resume`` continues with
exactly the batches it would have seen. ``--retrieval-mix SHARE`` hides ``--retrieval-facts``
made-up facts ("The code for the otter is 31415.") at random depths of that share of the windows
and ends them with questions about the facts and their answers; the mean loss on the answers,
times ``--retrieval-weight``, is added to the window's LM loss (``answer_loss`` in the log). Books
alone never ask a model to copy a fact from far back; a small model extended on them loses the
retrieval it had (``attn_patch.training.RetrievalMix``).

Output (``--out``): ``adapter/`` (PEFT adapter: LoRA + the trained embeddings and norms),
``attn_patch.json`` (base model, RoPE scaling, attention method and options, training summary),
``log.jsonl`` (loss, learning rate, tokens, step time and peak memory per logged step),
``checkpoint/`` (adapter, optimizer, scheduler, step) and, with ``--merge``, ``merged/``: a
standalone transformers model (weights + tokenizer) whose config carries the RoPE scaling
(``recipes/longlora_merge.py`` does the same for a finished run).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from attn_patch.training import (HelpFormatter, RetrievalMix, add_data_arguments, add_loop_arguments,  # noqa: E402
                                 chunked_lm_loss, document_positions, enable_checkpointing, finish_run, head_nll,
                                 lr_lambda, run_steps, start_run, token_windows)

# per family: LoRA targets (q, k, v, o projections) and the embeddings and norms trained in full
LORA_DEFAULTS = {
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj"], ["embed_tokens", "norm"]),
    "mistral": (["q_proj", "k_proj", "v_proj", "o_proj"], ["embed_tokens", "norm"]),
    "qwen2": (["q_proj", "k_proj", "v_proj", "o_proj"], ["embed_tokens", "norm"]),
    "gpt2": (["attn.c_attn", "attn.c_proj"], ["wte", "wpe", "ln_1", "ln_2", "ln_f"]),
    "gpt_neox": (["query_key_value", "attention.dense"], ["embed_in", "layernorm", "final_layer_norm"]),
}
RUN_FILE = "attn_patch.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_arguments(ap)
    ap.add_argument("--rope-scaling", help="RoPE scaling for the extended context (linear:4, yarn:4, llama3:4, ntk:4, "
                                           "theta:1e6:4 or JSON; see attn_patch.models.parse_rope_scaling); kept "
                                           "in the merged model's config")
    ap.add_argument("--seq-len", type=int, default=32768, help="tokens per training sequence")
    ap.add_argument("--doc-mask", action="store_true", help="no attention across EOS boundaries inside a window")
    ap.add_argument("--attention", default="longlora", choices=["longlora", "flash", "seer", "sdpa"],
                    help="attention while training (sdpa: transformers' own, unpatched)")
    ap.add_argument("--attention-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the attention method, e.g. group=0.25, sink=4 (repeatable)")
    ap.add_argument("--sdpa-backend", choices=["flash", "cudnn", "efficient", "math"],
                    help="pin torch SDPA to one backend (with --attention sdpa)")
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--lora-alpha", type=float, default=16, help="LoRA scaling numerator (the update is alpha / r)")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    ap.add_argument("--lora-targets", nargs="+", help="module names for LoRA (default: the family's q, k, v, o)")
    ap.add_argument("--trainable", nargs="*", help="modules trained in full, PEFT modules_to_save (default: the "
                                                   "family's embeddings and norms; pass nothing for LoRA only)")
    ap.add_argument("--merge", action="store_true", help="also write OUT/merged, a standalone model")
    ap.add_argument("--retrieval-mix", type=float, default=0.0, metavar="SHARE",
                    help="share of the windows that also get --retrieval-facts made-up facts at random depths and "
                         "questions about them at the end (attn_patch.training.RetrievalMix); 0: plain text")
    ap.add_argument("--retrieval-facts", type=int, default=8, help="facts per retrieval window")
    ap.add_argument("--retrieval-weight", type=float, default=1.0,
                    help="weight of the mean loss on the answers, added to the mean LM loss (scaled by the share "
                         "of mixed windows in the micro-batch)")
    add_loop_arguments(ap, lr=2e-4, schedule="constant")  # LongLoRA: constant after warmup
    return ap.parse_args(argv)


def parse_options(items: list[str]) -> dict:
    """``["group=0.25", "sink=4", "inference=s2"]`` -> typed dict (JSON values where they parse)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--attention-opt {item!r}: use KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class CausalLMLoss(torch.nn.Module):
    """The model's body and a chunked next-token loss in one module, so DDP sees one forward."""

    def __init__(self, peft_model, chunk: int):
        super().__init__()
        self.model = peft_model
        self.chunk = chunk

    def forward(self, input_ids, position_ids=None, answers=None):
        """Summed NLL and predicted tokens; with ``answers`` (a [B, T] bool mask of tokens) also the
        summed NLL of those tokens and their number."""
        lm = self.model.get_base_model()
        hidden = lm.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        head = lm.get_output_embeddings()
        nll, count = chunked_lm_loss(hidden, head, input_ids, self.chunk)
        if answers is None:
            return nll, count
        at = answers[:, 1:].nonzero(as_tuple=True)  # token t + 1 is predicted from position t
        return nll, count, head_nll(hidden[:, :-1][at], head, input_ids[:, 1:][at]), int(at[0].numel())


def lora_model(model, args):
    """PEFT LoRA + modules_to_save on the family's defaults (or the user's lists)."""
    from peft import LoraConfig, get_peft_model

    family = model.config.model_type
    targets, trainable = LORA_DEFAULTS.get(family, (None, None))
    targets = args.lora_targets or targets
    trainable = trainable if args.trainable is None else args.trainable
    if targets is None:
        raise SystemExit(f"no default LoRA targets for model family {family!r}: pass --lora-targets and --trainable")
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and bool(trainable)
    extra = {}
    if tied:
        if "ensure_weight_tying" not in LoraConfig.__dataclass_fields__:
            raise SystemExit("the model ties its input and output embeddings; training the embeddings keeps them tied "
                             "only with peft >= 0.18 (ensure_weight_tying): pip install -U peft, or pass --trainable "
                             "without the embedding")
        extra["ensure_weight_tying"] = True
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, modules_to_save=list(trainable) or None, task_type="CAUSAL_LM",
                        **extra)
    return get_peft_model(model, config)


def _merge_module():
    spec = importlib.util.spec_from_file_location("longlora_merge", Path(__file__).with_name("longlora_merge.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    args = parse_args(argv)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    import attn_patch
    from attn_patch.evals.common import load_model
    from attn_patch.models import parse_rope_scaling

    options = parse_options(args.attention_opt)
    if args.attention == "sdpa" and options:
        raise SystemExit("--attention-opt sets options of an attn_patch method; --attention sdpa has none")
    if args.sdpa_backend and args.attention != "sdpa":
        raise SystemExit("--sdpa-backend pins transformers' SDPA attention: use it with --attention sdpa")
    cuda = torch.cuda.is_available()
    precision = args.mixed_precision or ("bf16" if cuda else "no")
    accelerator, docs = start_run(args, precision)
    out = Path(args.out)
    device = accelerator.device
    scaling = parse_rope_scaling(args.rope_scaling)
    model, tokenizer = load_model(args.model, device=str(device), dtype="float32", rope_scaling=scaling)
    for p in model.parameters():
        p.requires_grad_(False)
    if args.attention != "sdpa":
        attn_patch.apply(model, args.attention, **options)
    if not args.no_gradient_checkpointing:
        enable_checkpointing(model)
    peft_model = lora_model(model, args)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    windows = token_windows(tokenizer, docs, args.seq_len)
    n_params = sum(p.numel() for p in params)
    accelerator.print(f"{len(docs)} documents -> {windows.shape[0]} windows of {args.seq_len} tokens; "
                      f"{n_params / 1e6:.2f} M trainable parameters; attention {args.attention} {options or ''}; "
                      f"RoPE {getattr(model.config, 'rope_parameters', None)}; {accelerator.num_processes} process(es)")

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.warmup, args.steps, args.min_lr_ratio, args.schedule))
    wrapper, optimizer, scheduler = accelerator.prepare(CausalLMLoss(peft_model, args.loss_chunk), optimizer,
                                                        scheduler)
    ckpt = out / "checkpoint"
    start = 0
    if args.resume:
        if not (ckpt / "trainer_state.pt").is_file():
            raise SystemExit(f"--resume: no checkpoint at {ckpt}")
        state_dict = load_file(ckpt / "adapter" / "adapter_model.safetensors", device=str(device))
        result = set_peft_model_state_dict(peft_model, state_dict)
        if getattr(result, "unexpected_keys", None):
            raise SystemExit(f"--resume: the checkpoint does not match this model: {result.unexpected_keys[:4]}")
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        accelerator.print(f"resumed from {ckpt} at step {start}")

    tokens_per_step = args.seq_len * args.batch_size * args.grad_accum * accelerator.num_processes
    run_info = {"recipe": "recipes/longlora_train.py", "model": args.model, "rope_scaling": scaling,
                "attention": args.attention, "attention_options": options, "seq_len": args.seq_len,
                "doc_mask": args.doc_mask}

    def save(path: Path, step: int, final: dict | None = None) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
            peft_model.save_pretrained(path / "adapter")
            training = {"step": step, "tokens": step * tokens_per_step, "data": [Path(d).name for d in args.data],
                        "lr": args.lr, "schedule": args.schedule, "warmup": args.warmup,
                        "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                        "processes": accelerator.num_processes, "lora_r": args.lora_r,
                        "lora_alpha": args.lora_alpha, "mixed_precision": precision, **(final or {})}
            (path / RUN_FILE).write_text(json.dumps({**run_info, "training": training}, indent=2) + "\n")
            if path == ckpt:
                torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "args": vars(args)}, ckpt / "trainer_state.pt")
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    # --sdpa-backend holds for the whole loop, not only the forward: gradient checkpointing recomputes
    # the layers in backward, and a recompute on another backend saves tensors of other shapes
    # (CheckpointError) or silently times a different kernel
    pin = nullcontext()
    if args.sdpa_backend:
        from torch.nn.attention import sdpa_kernel

        from attn_patch.benchmarking import sdpa_backend

        pin = sdpa_kernel([sdpa_backend(args.sdpa_backend)])
    eos = tokenizer.eos_token_id
    if args.doc_mask and eos is None:
        raise SystemExit("--doc-mask splits windows at EOS, but the tokenizer has no eos_token_id")

    def micro_step(ids, answers=None):
        positions = document_positions(ids, eos) if args.doc_mask else None
        if answers is None:
            nll, count = wrapper(ids, positions)
            return nll / count, {"loss": nll, "tokens": count}
        nll, count, answer_nll, n_answers = wrapper(ids, positions, answers)
        # the answers' mean loss counts once per mixed window, whatever the batch size
        mixed = answers.any(dim=1).float().mean()
        loss = nll / count + args.retrieval_weight * mixed * answer_nll / max(n_answers, 1)
        return loss, {"loss": nll, "tokens": count, "answer_loss": answer_nll, "answer_loss_count": n_answers}

    mix = None
    if args.retrieval_mix != 0:
        if args.doc_mask:
            raise SystemExit("--retrieval-mix asks at a window's end about facts anywhere in it, which --doc-mask "
                             "hides behind EOS boundaries: use one of the two")
        mix = RetrievalMix(tokenizer, args.retrieval_mix, args.retrieval_facts, args.seed)
        mix.window(windows[0].tolist(), random.Random(0))  # do the facts fit a window?
        run_info["retrieval_mix"] = {"share": args.retrieval_mix, "facts": args.retrieval_facts,
                                     "weight": args.retrieval_weight}

    with pin:
        final = run_steps(accelerator, args, model=wrapper, optimizer=optimizer, scheduler=scheduler, params=params,
                          windows=windows, start=start, micro_step=micro_step, checkpoint=lambda step: save(ckpt, step),
                          out=out, desc=f"longlora ({args.attention})", mix=mix)
    if final is None:  # --stop-at
        return finish_run(accelerator)
    save(out, args.steps, final)
    accelerator.print(f"saved the adapter to {out / 'adapter'}")
    if args.merge and accelerator.is_main_process:
        del wrapper, optimizer, peft_model, model
        _merge_module().merge(out, out / "merged", device=str(device))
    return finish_run(accelerator)


if __name__ == "__main__":
    sys.exit(main())
