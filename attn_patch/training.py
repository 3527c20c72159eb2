"""What the training recipes share: packing text into windows, the window order across ranks and
resumes, the learning-rate schedule, the held-out evaluation books, and a causal-LM loss that never
holds the ``[tokens, vocab]`` logits of a long sequence at once.

The recipes themselves live in ``recipes/`` (``accelerate launch recipes/...``); this module only
needs torch, so the recipes' CPU tests and the library agree on one definition.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .evals.common import HelpFormatter  # noqa: F401  (the recipes' --help layout)

# evaluation text (scripts/reproduce_eval.sh) that no recipe may train on unless told to
HELD_OUT = ("pride_and_prejudice", "news_from_nowhere")


def add_loop_arguments(ap, *, lr: float, schedule: str) -> None:
    """The options every training recipe's loop takes (optimizer, schedule, precision, output,
    checkpoints), with the recipe's own default learning rate and schedule."""
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per process")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--schedule", default=schedule, choices=["constant", "cosine"], help="after warmup")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    ap.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--mixed-precision", choices=["bf16", "fp16", "no"],
                    help="autocast for the forward (default: bf16 on GPU, no on CPU); weights stay fp32")
    ap.add_argument("--loss-chunk", type=int, default=4096, help="positions per chunk of the output layer + loss")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    ap.add_argument("--stop-at", type=int, help="checkpoint and stop after this step (resume later with --resume)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of the decoder layers (renamed
    activation_checkpointing_enable in transformers 5.2x; the old name warns there)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def refuse_held_out(docs, allow: bool) -> None:
    held = [d.name for d in docs if any(h in Path(d.name).name for h in HELD_OUT)]
    if held and not allow:
        raise SystemExit(f"{held} are held out for evaluation; train on other text or pass --allow-eval-text")


def token_windows(tokenizer, docs, seq_len: int) -> torch.Tensor:
    """[N, seq_len] int64: the documents tokenised, joined with EOS, cut into whole windows."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise SystemExit(f"the training text has {len(stream)} tokens, fewer than one --seq-len {seq_len} window")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def document_positions(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Position ids that restart after every EOS in each row of ``ids`` [B, T]: transformers reads
    restarting position ids as packed documents and masks attention across their boundaries."""
    t = ids.shape[-1]
    idx = torch.arange(t, device=ids.device).expand_as(ids)
    after_eos = torch.zeros_like(ids, dtype=torch.bool)
    after_eos[:, 1:] = ids[:, :-1] == eos_token_id
    starts = torch.where(after_eos, idx, torch.zeros_like(idx))
    return idx - torch.cummax(starts, dim=-1).values


def window_index(micro: int, rank: int, world: int, batch: int, n: int, seed: int) -> list[int]:
    """The windows of global micro-batch ``micro`` for ``rank``: positions in a seeded permutation
    per epoch, never repeating inside an epoch across ranks."""
    out = []
    for j in range(batch):
        slot = (micro * world + rank) * batch + j
        epoch, pos = divmod(slot, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(perm[pos]))
    return out


def lr_lambda(warmup: int, total: int, min_ratio: float, schedule: str = "cosine"):
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` (or constant)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule {schedule!r}: use 'cosine' or 'constant'")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if schedule == "constant":
            return 1.0
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def chunked_lm_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk: int = 2048
                    ) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL and the number of predicted tokens.

    ``hidden`` [B, T, H] are the final hidden states, ``head`` the output embedding module (called, so
    wrappers such as PEFT's trained copies apply), ``labels`` [B, T] with -100 for
    positions not scored. Position t predicts label t + 1. Each chunk of positions computes its
    logits in fp32 and is recomputed in the backward pass (activation checkpointing), so only one
    chunk's ``[chunk, vocab]`` logits exist at a time, forward or backward.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        hs, ys = h[s:s + chunk], y[s:s + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_nll, hs, head, ys, use_reentrant=False)
        else:
            total = total + _head_nll(hs, head, ys)
    return total, int((y != -100).sum())


def _head_nll(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum", ignore_index=-100)


def chunked_distill_loss(hidden: torch.Tensor, head: torch.nn.Module, teacher_hidden: torch.Tensor,
                         teacher_head: torch.nn.Module, labels: torch.Tensor, chunk: int = 2048
                         ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed next-token NLL, summed KL(teacher || student) over the vocabulary, and the number of
    scored positions, chunk by chunk as in :func:`chunked_lm_loss` (the teacher's logits of a chunk
    are recomputed from ``teacher_hidden`` and never need gradients)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    th = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1]).detach()
    y = labels[:, 1:].reshape(-1)
    nll = kl = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        args = (h[s:s + chunk], head, th[s:s + chunk], teacher_head, y[s:s + chunk])
        both = checkpoint(_head_nll_kl, *args, use_reentrant=False) if torch.is_grad_enabled() else _head_nll_kl(*args)
        nll, kl = nll + both[0], kl + both[1]
    return nll, kl, int((y != -100).sum())


def _head_nll_kl(hidden, head, teacher_hidden, teacher_head, targets) -> torch.Tensor:
    logp = F.log_softmax(head(hidden).float(), dim=-1)
    with torch.no_grad():
        logq = F.log_softmax(teacher_head(teacher_hidden).float(), dim=-1)
    keep = (targets != -100).float()
    nll = F.nll_loss(logp, targets, reduction="sum", ignore_index=-100)
    kl = ((logq.exp() * (logq - logp)).sum(-1) * keep).sum()
    return torch.stack([nll, kl])
