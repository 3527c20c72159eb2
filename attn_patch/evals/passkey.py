"""Passkey retrieval (as in LongLoRA): a pass key (an integer 1..49999) hidden at a random depth in
repeated filler sentences; the model completes "The pass key is". Scored by exact match of the first
integer in the greedy continuation; accuracy per context length.

Prompts are assembled from token ids, exactly the requested number of tokens. Plain (LongLoRA's
format)::

    [BOS] instruction | filler ... pass key sentence ... filler | question "The pass key is"

or (``chat=True``, ``--chat``) one user message in the model's chat template holding instruction,
filler and question, with "The pass key is" opening the assistant's reply. The plain format is the
default: SmolLM2-135M-Instruct reads the chat form as a question about what a pass key is (on the
H200 it scored 0.5 / 0.0 / 0.0 / 0.3 at 1k / 2k / 4k / 8k, against 1.0 / 1.0 / 1.0 / 0.6 plain).

Usable from Python (:func:`build_passkey_prompt`, :func:`evaluate_passkey`) and from the command line
(``python scripts/eval_passkey.py --help``).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from ..errors import ConfigError
from . import common
from .needle import (SNAP_TOKENS, _as_specs, _check_lengths, _warn_context, encode, generate_continuation,
                     leading_special_ids, pad_id, prompt_frame, sentence_end_flags, snap_back, trial_rng)

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
               "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
CHAT_QUESTION, CHAT_ANSWER = "What is the pass key?", "The pass key is"

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
MAX_KEY = 49999
_INT_RE = re.compile(r"\d+")


def build_passkey_prompt(tokenizer, length: int, key: int | str, depth: float, *, snap: int = SNAP_TOKENS,
                         chat: bool = False) -> dict:
    """One passkey prompt of exactly ``length`` tokens.

    The filler is repeated to fill the context; the pass key sentence goes at the token position
    closest to ``depth`` (a fraction: 0.0 right after the instruction, 1.0 right before the question),
    moved back to the start of a filler sentence. Returns input_ids (1-D LongTensor), key_start /
    key_end (token positions of the pass key sentence), context_start / context_end, depth (actual).
    """
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth {depth}: use a fraction between 0 and 1")
    if chat:
        prefix, suffix, _, _ = prompt_frame(tokenizer, CHAT_QUESTION, INSTRUCTION, CHAT_ANSWER, chat=True)
    else:
        prefix = leading_special_ids(tokenizer) + encode(tokenizer, INSTRUCTION + "\n")
        suffix = encode(tokenizer, "\n" + QUESTION)
    key_text = KEY_LINE.format(key=key)
    key_ids = encode(tokenizer, " " + key_text)
    unit = encode(tokenizer, " " + FILLER)
    n_fill = length - len(prefix) - len(suffix) - len(key_ids)
    if n_fill < 0:
        raise ConfigError(f"length {length} is too short: the instruction, pass key and question alone take "
                          f"{length - n_fill} tokens")
    fill = (unit * (n_fill // len(unit) + 1))[:n_fill]
    pos = round(depth * n_fill)
    if 0 < pos < n_fill and snap > 0:
        pos = snap_back(sentence_end_flags(tokenizer, fill), pos, snap)
    ids = prefix + fill[:pos] + key_ids + fill[pos:] + suffix
    assert len(ids) == length, (len(ids), length)
    start = len(prefix) + pos
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "key_start": start, "key_end": start + len(key_ids),
            "context_start": len(prefix), "context_end": length - len(suffix),
            "depth": pos / n_fill if n_fill else 0.0, "key_text": key_text}


def extract_int(text: str) -> int | None:
    """The first integer in ``text`` (None if there is none)."""
    match = _INT_RE.search(text)
    return int(match.group(0)) if match else None


def evaluate_passkey(model, tokenizer, methods, lengths, trials: int = 10, *, seed: int = 0,
                     max_new_tokens: int = 16, chat: bool = False, show_progress: bool = True) -> dict:
    """Accuracy of each method per context length over ``trials`` prompts per length. Each trial draws
    its pass key (uniform in 1..49999) and depth (uniform in 0..1) from ``seed``, length and trial
    number; every method sees the same prompts. ``chat``: the chat-template prompt instead of the plain one.

    Returns a JSON-able dict: settings, and per method label: accuracy per length, overall mean,
    agreement with the first method, seconds, and per-trial records.
    """
    specs = _as_specs(methods)
    lengths = _check_lengths(lengths)
    if trials < 1:
        raise ConfigError(f"trials {trials}: use at least 1")
    prompts = []
    for li, length in enumerate(lengths):
        for t in range(trials):
            rng = trial_rng("passkey", seed, length, t)
            key, depth = rng.randint(1, MAX_KEY), rng.random()
            prompts.append((li, t, key, depth, build_passkey_prompt(tokenizer, length, key, depth, chat=chat)))

    pad = pad_id(tokenizer)
    results = {}
    reference_texts = None
    bar = common.progress(total=len(prompts) * len(specs), desc="passkey", disable=not show_progress)
    for spec in specs:
        hits = [0] * len(lengths)
        records = []
        start = time.perf_counter()
        with spec.context(model):
            for li, t, key, depth, p in prompts:
                new = generate_continuation(model, p["input_ids"], max_new_tokens, pad)
                text = tokenizer.decode(new, skip_special_tokens=True)
                pred = extract_int(text)
                correct = pred == key
                hits[li] += correct
                records.append({"length": lengths[li], "trial": t, "key": key, "depth": round(depth, 4),
                                "actual_depth": round(p["depth"], 4), "key_start": p["key_start"],
                                "key_end": p["key_end"], "generated": text, "predicted": pred,
                                "correct": bool(correct)})
                bar.set_postfix_str(f"{spec.label} {lengths[li]} tok: {'ok' if correct else 'miss'}", refresh=False)
                bar.update(1)
            attention = common.take_stats(model)
        texts = [r["generated"] for r in records]
        if reference_texts is None:
            reference_texts = texts
        results[spec.label] = {
            "method": spec.method, "options": spec.options,
            "accuracy": [h / trials for h in hits], "mean": sum(hits) / len(prompts),
            "same_generation_as_first": sum(a == b for a, b in zip(texts, reference_texts)) / len(prompts),
            "seconds": round(time.perf_counter() - start, 2), "attention": attention, "records": records,
        }
    bar.close()
    return {
        "task": "passkey",
        "settings": {"lengths": lengths, "trials": trials, "seed": seed, "max_new_tokens": max_new_tokens, "chat": chat,
                     "instruction": INSTRUCTION, "filler": FILLER, "key_line": KEY_LINE, "question": QUESTION,
                     "scoring": "exact match: the first integer in the continuation equals the pass key"},
        "methods": results,
    }


def format_table(result: dict) -> str:
    """Plain-text table: length rows x method columns of accuracy."""
    s = result["settings"]
    labels = list(result["methods"])
    width = max(8, *(len(label) + 2 for label in labels))
    lines = [f"passkey retrieval: accuracy (exact match of the pass key), {s['trials']} trial(s) per length",
             "length".ljust(10) + "".join(label.rjust(width) for label in labels)]
    for li, n in enumerate(s["lengths"]):
        lines.append(str(n).ljust(10) + "".join(f"{result['methods'][m]['accuracy'][li]:.2f}".rjust(width)
                                                for m in labels))
    lines.append("mean".ljust(10) + "".join(f"{result['methods'][m]['mean']:.2f}".rjust(width) for m in labels))
    lines.append("same out".ljust(10) + "".join(
        f"{result['methods'][m]['same_generation_as_first']:.2f}".rjust(width) for m in labels))
    lines.append(f"(same out: share of trials whose generated tokens equal {labels[0]}'s exactly)")
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    s = result["settings"]
    labels = list(result["methods"])
    rows = [[n] + [f"{result['methods'][m]['accuracy'][li]:.2f}" for m in labels] for li, n in enumerate(s["lengths"])]
    rows.append(["mean"] + [f"{result['methods'][m]['mean']:.2f}" for m in labels])
    rows.append(["same output as first"] + [f"{result['methods'][m]['same_generation_as_first']:.2f}"
                                            for m in labels])
    return (f"## Passkey retrieval\n\nExact match of the pass key (1..{MAX_KEY}) at a random depth; "
            f"{s['trials']} trial(s) per length, {'chat' if s.get('chat') else 'plain'} prompt, "
            f"greedy decoding ({s['max_new_tokens']} new tokens), "
            f"seed {s['seed']}.\n\n" + common.markdown_table(["length"] + labels, rows) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), metavar="N",
                        help="prompt lengths in tokens")
    parser.add_argument("--trials", type=int, default=10, help="prompts per length")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the tokenizer's chat template (default: LongLoRA's plain text)")
    common.add_common_arguments(parser)


def run(args) -> int:
    _check_lengths(args.lengths)
    model, tokenizer, methods, device, dtype = common.setup_from_args(args)
    _warn_context(model, args.lengths, args.max_new_tokens)
    result = evaluate_passkey(model, tokenizer, methods, args.lengths, args.trials, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, chat=args.chat)
    result["run"] = common.describe_run(model, device, dtype)
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        written = [common.write_json(result, out / "passkey.json")]
        (out / "passkey.md").write_text(format_markdown(result))
        written.append(out / "passkey.md")
        print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv=None) -> int:
    return common.script_main(add_arguments, run, __doc__, argv, prog="eval_passkey")


if __name__ == "__main__":
    sys.exit(main())
