"""What the training recipes share: packing text into windows, the window order across ranks and
resumes, the learning-rate schedule, the held-out evaluation books, a causal-LM loss that never
holds the ``[tokens, vocab]`` logits of a long sequence at once, and the optimizer loop itself
(:func:`run_steps`: gradient accumulation, logging, checkpoints).

The recipes themselves live in ``recipes/`` (``accelerate launch recipes/...``); this module only
needs torch, so the recipes' CPU tests and the library agree on one definition.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .evals.common import HelpFormatter  # noqa: F401  (the recipes' --help layout)

# evaluation text (scripts/reproduce_eval.sh) that no recipe may train on unless told to
HELD_OUT = ("pride_and_prejudice", "news_from_nowhere")


def add_data_arguments(ap) -> None:
    """The model and text options every training recipe takes."""
    ap.add_argument("--model", help="HF model folder or .gguf, or arch:NAME (a named architecture with random weights, "
                                    "e.g. arch:llama-3.1-8b: speed and memory only) (default: the embedded "
                                    "SmolLM2-135M-Instruct)")
    ap.add_argument("--data", nargs="+", required=True, help="text files, directories, globs or hf:NAME")
    ap.add_argument("--text-field", default="text", help="column of a datasets dataset")
    ap.add_argument("--allow-eval-text", action="store_true",
                    help=f"allow training on the held-out evaluation books ({', '.join(HELD_OUT)})")


def add_loop_arguments(ap, *, lr: float, schedule: str) -> None:
    """The options every training recipe's loop takes (optimizer, schedule, precision, output,
    checkpoints), with the recipe's own default learning rate and schedule."""
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per process")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    ap.add_argument("--schedule", default=schedule, choices=["constant", "cosine"], help="after warmup")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    ap.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0: no clipping)")
    ap.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="keep every activation instead of recomputing the layers in backward (faster, more memory)")
    ap.add_argument("--mixed-precision", choices=["bf16", "fp16", "no"],
                    help="autocast for the forward (default: bf16 on GPU, no on CPU); weights stay fp32")
    ap.add_argument("--loss-chunk", type=int, default=4096, help="positions per chunk of the output layer + loss")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    ap.add_argument("--stop-at", type=int, help="checkpoint and stop after this step (resume later with --resume)")
    ap.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    ap.add_argument("--seed", type=int, default=0, help="seed for initialisation and the window order")


def start_run(args, mixed_precision: str | None = None):
    """(accelerator, documents): the run's Accelerator (``mixed_precision`` if given), the seed set,
    and the ``--data`` documents loaded, refusing the held-out evaluation books."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .evals.text import load_texts

    accelerator = Accelerator(mixed_precision=mixed_precision) if mixed_precision else Accelerator()
    set_seed(args.seed)
    docs = load_texts(args.data, text_field=args.text_field)
    refuse_held_out(docs, args.allow_eval_text)
    return accelerator, docs


def finish_run(accelerator) -> int:
    """End a recipe's run (trackers, process group) and return its exit code, 0.

    A worker process of a multi-process launch (torchrun / accelerate launch) then exits at once with
    ``os._exit(0)``, once every rank is done and its output is flushed: letting Python free the DDP
    model instead destroys the gloo process group inside that deallocation, which joins gloo's worker
    threads while holding the GIL, and a worker thread still releasing the last collective's tensors
    waits for the GIL: a deadlock (seen in CI with torch 2.13 on CPU, one rank hanging forever)."""
    distributed = accelerator.num_processes > 1 and "TORCHELASTIC_RUN_ID" in os.environ
    if distributed:
        accelerator.wait_for_everyone()
    accelerator.end_training()
    if distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


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


def spread_windows(windows: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``count`` windows [1, T] spread evenly over ``windows`` [N, T] (every document sampled, not the
    first ones): the calibration text of the recipes and scripts."""
    pick = torch.linspace(0, windows.shape[0] - 1, min(count, windows.shape[0])).round().long().unique()
    return [windows[i:i + 1] for i in pick.tolist()]


# --retrieval-mix: facts about made-up names hidden in the training text, asked about at its end
RETRIEVAL_NAMES = (
    "amber", "anchor", "badger", "barley", "beacon", "bramble", "cedar", "chestnut", "cobalt", "compass",
    "copper", "cricket", "falcon", "fennel", "granite", "harbour", "hazel", "heron", "juniper", "kestrel",
    "lantern", "larch", "marble", "meadow", "nutmeg", "orchard", "otter", "pepper", "pewter", "quarry",
    "raven", "saffron", "sparrow", "spindle", "thistle", "timber", "tulip", "velvet", "walnut", "willow")
RETRIEVAL_TEMPLATES = (  # (statement, question, answer prefix); none says "pass key" or "remember"
    ("The code for the {name} is {value}.", "What is the code for the {name}?", "The code for the {name} is"),
    ("The {name} number is {value}.", "What is the {name} number?", "The {name} number is"),
    ("The secret of the {name} is the number {value}.", "What is the secret of the {name}?",
     "The secret of the {name} is the number"),
)


class RetrievalMix:
    """Long-range retrieval practice mixed into language-model windows (``--retrieval-mix``).

    A share ``fraction`` of the windows (drawn per micro-batch from ``seed``, so a resumed run sees
    the same) gets ``facts`` statements such as "The code for the otter is 31415." inserted into its
    text, each at a sentence boundary (the last one within 64 tokens before a random position; the
    position itself if there is none), and ends with a question about each of them followed by its
    answer ("What is the code for the otter? The code for the otter is 31415."), in random order.
    The window's text is cut at its end to keep the window's length. Names come from
    :data:`RETRIEVAL_NAMES`, values are uniform in 1..99999, the wording from one of
    :data:`RETRIEVAL_TEMPLATES` per window. The question and answer have the form of the passkey
    test's ("What is X? The X is N"); the facts, their wording and the text around them do not. A
    model trained on books alone has nothing that asks it to copy a fact from far back; this does
    (synthetic key-value retrieval, as in Xiong et al. 2024, "From Artificial Needles to Real
    Haystacks").

    ``mix(ids, micro)`` takes ``[B, T]`` windows and returns ``(ids, answers)``: the new windows and a
    bool mask of the answer tokens (the tokens of " VALUE" after each question, the leading space
    included where the tokenizer splits it off), all False for untouched rows.
    """

    def __init__(self, tokenizer, fraction: float, facts: int = 8, seed: int = 0):
        if not 0.0 <= fraction <= 1.0:
            raise SystemExit(f"--retrieval-mix {fraction}: a share of the windows, between 0 and 1")
        if not 1 <= facts <= len(RETRIEVAL_NAMES):
            raise SystemExit(f"--retrieval-facts {facts}: between 1 and {len(RETRIEVAL_NAMES)}")
        self.tokenizer, self.fraction, self.facts, self.seed = tokenizer, fraction, facts, seed
        self._ends: dict[int, bool] = {}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _sentence_ends(self, ids: list[int]) -> list[bool]:
        from .evals.needle import sentence_end_flags

        new = sorted(set(ids) - self._ends.keys())
        if new:
            self._ends.update(zip(new, sentence_end_flags(self.tokenizer, new)))
        return [self._ends[i] for i in ids]

    def __call__(self, ids: torch.Tensor, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        import random

        rng = random.Random(self.seed * 1_000_003 + micro)
        out, answers = ids.clone(), torch.zeros_like(ids, dtype=torch.bool)
        for b in range(ids.shape[0]):
            if rng.random() < self.fraction:
                row, mask = self.window(ids[b].tolist(), rng)
                out[b] = torch.tensor(row, dtype=ids.dtype)
                answers[b] = torch.tensor(mask)
        return out, answers

    def window(self, text: list[int], rng) -> tuple[list[int], list[bool]]:
        """One window of ``len(text)`` tokens: ``text`` with the statements inserted and the questions
        appended (see the class doc); returns the token ids and the answer-token mask."""
        from .evals.needle import SNAP_TOKENS, snap_back

        statement, question, answer = rng.choice(RETRIEVAL_TEMPLATES)
        names = rng.sample(RETRIEVAL_NAMES, self.facts)
        values = [rng.randint(1, 99999) for _ in names]
        facts = [self._encode(" " + statement.format(name=n, value=v)) for n, v in zip(names, values)]
        tail, stop = self._encode("\n"), self._encode(".")
        mask = [False] * len(tail)
        for i in rng.sample(range(self.facts), self.facts):
            asked = self._encode(" " + question.format(name=names[i]) + " " + answer.format(name=names[i]))
            value = self._encode(f" {values[i]}")
            tail += asked + value + stop
            mask += [False] * len(asked) + [True] * len(value) + [False] * len(stop)
        room = len(text) - len(tail) - sum(len(f) for f in facts)
        if room < len(text) // 2:
            raise SystemExit(f"--retrieval-facts {self.facts} do not fit a window of {len(text)} tokens: "
                             "use fewer facts or a longer --seq-len")
        body = text[:room]
        ends = self._sentence_ends(body)
        cuts = sorted(snap_back(ends, rng.randint(0, room), SNAP_TOKENS) for _ in facts)
        row, prev = [], 0
        for cut, fact in zip(cuts, facts):
            row += body[prev:cut] + fact
            prev = cut
        row += body[prev:] + tail
        return row, [False] * (len(row) - len(mask)) + mask


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
            total = total + checkpoint(head_nll, hs, head, ys, use_reentrant=False)
        else:
            total = total + head_nll(hs, head, ys)
    return total, int((y != -100).sum())


def head_nll(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL of ``targets`` [N] under ``head(hidden)`` [N, vocab] (fp32 logits; -100 ignored)."""
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


def run_steps(accelerator, args, *, model, optimizer, scheduler, params, windows: torch.Tensor, start: int,
              micro_step, checkpoint, out, desc: str, log_extra=None, train_mode: bool = True,
              mix=None) -> dict | None:
    """The optimizer loop the LM recipes share, from step ``start`` to ``--steps`` (or ``--stop-at``).

    Each micro-batch takes this rank's windows (:func:`window_index`, so a resumed run sees the same
    data) and calls ``micro_step(ids)`` -> ``(loss, sums)``: ``loss`` is backpropagated divided by
    ``--grad-accum`` (gradients sync across ranks on the last micro-batch only); ``sums`` holds
    quantities summed over the micro-batch's tokens (scalars or vectors), at least ``"loss"`` and
    ``"tokens"``; a key ``"X_count"`` makes ``"X"`` a mean over its own count instead of the tokens.
    With ``mix`` (e.g. a :class:`RetrievalMix`) it calls ``micro_step(*mix(ids, n))`` instead, ``n``
    numbering this rank's micro-batches across the run. Every ``--log-every`` steps
    ``OUT/log.jsonl`` gets their means since the last line over all ranks, the learning rate, tokens,
    times, peak memory and
    ``log_extra()``. ``checkpoint(step)`` runs every ``--save-every`` steps and at the end. The model
    runs in training mode unless ``train_mode=False`` (a frozen model whose added modules learn).
    Returns the run summary (first/final loss, seconds, median step time, device, peak memory), or
    None when ``--stop-at`` ended the run early.
    """
    from .evals.common import progress

    cuda = torch.cuda.is_available()
    device = accelerator.device
    tokens_per_step = windows.shape[1] * args.batch_size * args.grad_accum * accelerator.num_processes
    log = (Path(out) / "log.jsonl").open("a") if accelerator.is_main_process else None
    bar = progress(total=args.steps, initial=start, desc=desc, disable=not accelerator.is_main_process)
    model.train(train_mode)
    t0 = time.perf_counter()
    first = last = None
    step_times: list[float] = []
    sums: dict[str, torch.Tensor] = {}
    stop = min(args.steps, args.stop_at or args.steps)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(start, stop):
        t_step = time.perf_counter()
        for a in range(args.grad_accum):
            micro = step * args.grad_accum + a
            idx = window_index(micro, accelerator.process_index, accelerator.num_processes, args.batch_size,
                               windows.shape[0], args.seed)
            last_micro = a == args.grad_accum - 1
            ctx = accelerator.no_sync(model) if not last_micro and accelerator.num_processes > 1 else nullcontext()
            with ctx:
                if mix is None:
                    loss, values = micro_step(windows[idx].to(device))
                else:
                    batch = mix(windows[idx], micro * accelerator.num_processes + accelerator.process_index)
                    loss, values = micro_step(*(t.to(device) for t in batch))
                accelerator.backward(loss / args.grad_accum)
            for key, v in values.items():
                v = torch.as_tensor(v.detach() if torch.is_tensor(v) else v, dtype=torch.float64, device=device)
                sums[key] = sums[key] + v if key in sums else v
        if args.max_grad_norm:
            accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t_step)
        done = step + 1
        if done % args.log_every == 0 or done == stop or done == start + 1:
            total = {k: accelerator.reduce(v, reduction="sum") for k, v in sorted(sums.items())}
            tokens = total.pop("tokens")
            counts = {k[:-len("_count")]: total.pop(k) for k in list(total) if k.endswith("_count")}
            means = {k: (v / counts.get(k, tokens)).tolist() for k, v in total.items()
                     if counts.get(k, tokens) > 0}
            value = means.pop("loss")
            first = value if first is None else first
            last = value
            if accelerator.is_main_process:
                rec = {"step": done, "loss": round(value, 5), **{k: _rounded(v) for k, v in means.items()},
                       "lr": scheduler.get_last_lr()[0], "tokens": done * tokens_per_step,
                       "elapsed_s": round(time.perf_counter() - t0, 1), "step_s": round(step_times[-1], 4)}
                rec.update(log_extra() if log_extra is not None else {})
                if cuda:
                    rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix_str(f"loss {value:.4f}")
            sums = {}
        bar.update(1)
        if args.save_every and done % args.save_every == 0 and done < stop:
            checkpoint(done)
    bar.close()
    if log is not None:
        log.close()
    if stop > start:
        checkpoint(stop)
    if stop < args.steps:
        accelerator.print(f"stopped at step {stop} of {args.steps}; continue with --resume")
        return None
    final = {"first_loss": first, "final_loss": last, "train_seconds": round(time.perf_counter() - t0, 1),
             "median_step_s": round(statistics.median(step_times[1:] or step_times), 4) if step_times else None,
             "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    if cuda:
        final["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    accelerator.print(f"{stop - start} steps, {final['train_seconds']} s, {(stop - start) * tokens_per_step} "
                      f"tokens; loss {first} -> {last}")
    return final


def _rounded(v):
    return [round(x, 6) for x in v] if isinstance(v, list) else round(v, 6)
