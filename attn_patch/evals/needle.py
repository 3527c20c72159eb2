"""Needle in a haystack (RULER-style single needle): a 7-digit "special magic number" for a random word
is hidden at a chosen depth of a long text, and the model is asked for it. Scored by exact match of
the key in the greedy continuation; swept over context lengths x insertion depths.

Prompts are assembled from token ids, so every prompt is exactly the requested number of tokens and
the needle's tokens are the same wherever it lands::

    [BOS / chat header] instruction | haystack ... needle ... haystack | question [chat footer] answer prefix

Usable from Python (:func:`build_needle_prompt`, :func:`evaluate_needle`, :func:`plot_heatmap`) and
from the command line (``python scripts/eval_needle.py --help``).
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

import torch

from ..errors import ConfigError
from . import common
from .text import Document, generated_filler, load_texts

INSTRUCTION = ("Some special magic numbers are hidden within the following text. Read it carefully and "
               "memorize them: afterwards you will be asked for one of the numbers.")
NEEDLE = "One of the special magic numbers for {word} is: {key}."
QUESTION = "What is the special magic number for {word} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {word} mentioned in the provided text is"

# Needle words: adjective-noun pairs, digit-free and absent from the built-in filler.
_ADJECTIVES = ["amber", "brisk", "copper", "dusty", "elegant", "frozen", "gentle", "hollow", "ivory", "jolly",
               "lucky", "marble", "narrow", "olive", "purple", "rapid", "silent", "tidy", "velvet", "wild"]
_NOUNS = ["anchor", "badger", "cactus", "dolphin", "engine", "falcon", "guitar", "helmet", "igloo", "jacket",
          "kettle", "ladder", "magnet", "napkin", "oyster", "pencil", "rocket", "saddle", "tulip", "walnut"]

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)
SNAP_TOKENS = 64  # how far back the needle may move to land on a sentence boundary
MAX_HAYSTACK_CHARS = 4_000_000  # about a million tokens: more text only slows the tokenizer down
_PLACEHOLDER = "\u2063HAYSTACK\u2063"
_KEY_RE = re.compile(r"(?<!\d)\d{7}(?!\d)")


# ---------------------------------------------------------------- tokens

def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (and without the too-long-sequence warning)."""
    try:
        return list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
    except TypeError:  # a tokenizer without the verbose keyword
        return list(tokenizer(text, add_special_tokens=False).input_ids)


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a text (a BOS token for Llama-style tokenizers)."""
    plain = list(tokenizer("a", add_special_tokens=False).input_ids)
    full = list(tokenizer("a").input_ids)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_frame(tokenizer, question: str, instruction: str, answer_prefix: str | None,
                 chat: bool) -> tuple[list[int], list[int], str, str]:
    """(prefix ids, suffix ids, prefix text, suffix text) around the context.

    Chat: instruction, context and question form one user message (with the model's chat template and
    ``add_generation_prompt``), the answer prefix opens the assistant's reply. Plain: the same text with
    "Answer:" before the answer prefix, after the tokenizer's leading special tokens (BOS).
    """
    if chat:
        if not has_chat_template(tokenizer):
            raise ConfigError("chat=True but the tokenizer has no chat template: use the plain prompt (--no-chat)")
        content = f"{instruction}\n\n{_PLACEHOLDER}\n\n{question}"
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        if rendered.count(_PLACEHOLDER) != 1:
            raise ConfigError("the chat template does not reproduce the user message verbatim; use --no-chat")
        head, tail = rendered.split(_PLACEHOLDER)
        if answer_prefix:
            tail += answer_prefix
        return encode(tokenizer, head), encode(tokenizer, tail), head, tail
    head = f"{instruction}\n\n"
    tail = f"\n\n{question}" + (f" Answer: {answer_prefix}" if answer_prefix else "")
    return leading_special_ids(tokenizer) + encode(tokenizer, head), encode(tokenizer, tail), head, tail


def sentence_end_flags(tokenizer, ids: list[int]) -> list[bool]:
    """For each token: does its text end a sentence ('.', '!' or '?', possibly before a closing quote)?"""
    unique = sorted(set(ids))
    texts = tokenizer.batch_decode([[i] for i in unique]) if hasattr(tokenizer, "batch_decode") \
        else [tokenizer.decode([i]) for i in unique]
    ends = {i for i, t in zip(unique, texts) if t.rstrip().rstrip("\"'\u201d\u2019)]").endswith((".", "!", "?"))}
    return [i in ends for i in ids]


def snap_back(ends: list[bool], pos: int, limit: int = SNAP_TOKENS) -> int:
    """The largest position p in [pos - limit, pos] right after a sentence end (or 0); ``pos`` if none."""
    for p in range(pos, max(pos - limit, 0) - 1, -1):
        if p == 0 or ends[p - 1]:
            return p
    return pos


def _cyclic(ids: list[int], offset: int, count: int) -> list[int]:
    n = len(ids)
    out: list[int] = []
    start = offset % n
    while len(out) < count:
        out.extend(ids[start:start + count - len(out)])
        start = 0
    return out


def tokenize_haystack(tokenizer, haystack=None, *, min_tokens: int = 0, seed: int = 0) -> tuple[list[int], str]:
    """(token ids, description) of the haystack.

    ``haystack``: None (the built-in digit-free filler, generated long enough for ``min_tokens``), a
    string, or a list of :class:`Document` / strings (concatenated with blank lines; text beyond
    ``MAX_HAYSTACK_CHARS`` characters is left out)."""
    if haystack is None:
        n_sentences = max(min_tokens // 8, 0) + 200  # a filler sentence is 10+ tokens
        return encode(tokenizer, generated_filler(n_sentences, seed)), f"generated filler ({n_sentences} sentences)"
    if isinstance(haystack, str):
        docs = [Document("text", haystack)]
    else:
        docs = [d if isinstance(d, Document) else Document(f"text[{i}]", str(d)) for i, d in enumerate(haystack)]
    text = "\n\n".join(d.text.strip() for d in docs if d.text.strip())[:MAX_HAYSTACK_CHARS]
    ids = encode(tokenizer, text)
    if not ids:
        raise ConfigError("the haystack holds no text")
    names = [d.name for d in docs]
    desc = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return ids, desc


# ---------------------------------------------------------------- prompts

def build_needle_prompt(tokenizer, haystack_ids, length: int, depth: float, key: int | str, word: str, *,
                        offset: int = 0, chat: bool | None = None, insert_needle: bool = True,
                        snap: int = SNAP_TOKENS, instruction: str = INSTRUCTION) -> dict:
    """One needle prompt of exactly ``length`` tokens.

    ``depth`` is a fraction (0.0: right after the instruction, 1.0: right before the question); the
    needle goes at the token position closest to ``depth`` x (haystack tokens in the context), moved
    back by at most ``snap`` tokens to the start of a sentence. The haystack is read cyclically from
    ``offset`` (moved forward to a sentence start). ``chat``: None uses the chat template when the
    tokenizer has one. ``insert_needle=False`` builds the same prompt with haystack in the needle's
    place (a control: the answer is then not in the prompt).

    Returns input_ids (1-D LongTensor), needle_start / needle_end (token positions in input_ids, None
    without needle), context_start / context_end, depth (the actual one), offset, needle (its text),
    prefix / suffix (the text around the context).
    """
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth {depth}: use a fraction between 0 and 1")
    haystack_ids = haystack_ids.tolist() if isinstance(haystack_ids, torch.Tensor) else list(haystack_ids)
    if not haystack_ids:
        raise ConfigError("the haystack is empty")
    chat = has_chat_template(tokenizer) if chat is None else chat
    prefix, suffix, head, tail = prompt_frame(tokenizer, QUESTION.format(word=word), instruction,
                                              ANSWER_PREFIX.format(word=word), chat)
    needle_text = NEEDLE.format(word=word, key=key)
    needle = encode(tokenizer, " " + needle_text) if insert_needle else []
    n_hay = length - len(prefix) - len(suffix) - len(needle)
    if n_hay < 0 or (not insert_needle and n_hay == 0):
        raise ConfigError(f"length {length} is too short: the instruction, needle and question alone take "
                          f"{len(prefix) + len(suffix) + len(encode(tokenizer, ' ' + needle_text))} tokens")
    # start the haystack at a sentence start (at most `snap` tokens after the offset)
    window = _cyclic(haystack_ids, offset, snap + 1)
    flags = sentence_end_flags(tokenizer, window)
    shift = next((i + 1 for i, end in enumerate(flags[:snap]) if end), 0)
    offset = (offset + shift) % len(haystack_ids)
    hay = _cyclic(haystack_ids, offset, n_hay) if n_hay else []
    pos = round(depth * n_hay)
    if 0 < pos < n_hay and snap > 0:  # the ends (depth 0 and 100%) stay exactly at the ends
        pos = snap_back(sentence_end_flags(tokenizer, hay), pos, snap)
    ids = prefix + hay[:pos] + needle + hay[pos:] + suffix
    assert len(ids) == length, (len(ids), length)
    start = len(prefix) + pos
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "needle_start": start if insert_needle else None,
        "needle_end": start + len(needle) if insert_needle else None,
        "context_start": len(prefix),
        "context_end": length - len(suffix),
        "depth": pos / n_hay if n_hay else 0.0,
        "offset": offset,
        "needle": needle_text,
        "prefix": head,
        "suffix": tail,
        "chat": chat,
    }


def trial_rng(kind: str, seed: int, *parts) -> random.Random:
    """An independent, reproducible generator per trial (a string seed is hashed with SHA-512)."""
    return random.Random(":".join(str(p) for p in (kind, seed, *parts)))


def random_word(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


# ---------------------------------------------------------------- generation and scoring

def generate_continuation(model, input_ids: torch.Tensor, max_new_tokens: int, pad_token_id) -> list[int]:
    """Greedy continuation (new token ids) of one 1-D prompt; uses only ``model.generate`` (and
    ``model.device`` when the model has one)."""
    ids = input_ids[None]
    device = getattr(model, "device", None)
    if device is not None:
        ids = ids.to(device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def pad_id(tokenizer):
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)


def extract_key(text: str) -> str | None:
    """The first run of exactly 7 digits in ``text`` (None if there is none)."""
    match = _KEY_RE.search(text)
    return match.group(0) if match else None


def _as_specs(methods) -> list[common.MethodSpec]:
    if not methods:
        return common.parse_methods(None)
    if all(isinstance(m, common.MethodSpec) for m in methods):
        return list(methods)
    return common.parse_methods([m if isinstance(m, str) else m.label for m in methods])


def _check_lengths(lengths) -> list[int]:
    lengths = [int(n) for n in lengths]
    if not lengths or any(n <= 0 for n in lengths):
        raise ConfigError(f"lengths {lengths}: give one or more positive token counts")
    return lengths


def evaluate_needle(model, tokenizer, methods, lengths, depths=DEFAULT_DEPTHS, trials: int = 3, *, haystack=None,
                    seed: int = 0, max_new_tokens: int = 16, chat: bool | None = None, show_progress: bool = True,
                    insert_needle: bool = True) -> dict:
    """Accuracy of each method over a grid of context ``lengths`` (tokens) x needle ``depths`` (percent,
    0..100), ``trials`` prompts per cell. Every method sees the same prompts (key, word and haystack
    offset are drawn per trial from ``seed``, length, depth index and trial number).

    ``haystack``: None (built-in filler), a text, or a list of Documents. ``chat``: None uses the chat
    template when the tokenizer has one. ``insert_needle=False`` leaves the needle out (a control).

    Returns a JSON-able dict: settings, and per method label: accuracy grid ``[depth][length]``, mean
    per length, overall mean, agreement with the first method, seconds, and per-trial records.
    """
    specs = _as_specs(methods)
    lengths = _check_lengths(lengths)
    depths = [float(d) for d in depths]
    if not depths or any(not 0 <= d <= 100 for d in depths):
        raise ConfigError(f"depths {depths}: give one or more percentages between 0 and 100")
    if trials < 1:
        raise ConfigError(f"trials {trials}: use at least 1")
    chat = has_chat_template(tokenizer) if chat is None else chat
    hay_ids, hay_desc = tokenize_haystack(tokenizer, haystack, min_tokens=max(lengths), seed=seed)

    prompts = []  # built before any generation: a length that cannot hold the question fails at once
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            for t in range(trials):
                rng = trial_rng("needle", seed, length, di, t)
                key, word = rng.randint(1_000_000, 9_999_999), random_word(rng)
                offset = rng.randrange(len(hay_ids))
                p = build_needle_prompt(tokenizer, hay_ids, length, depth / 100, key, word, offset=offset,
                                        chat=chat, insert_needle=insert_needle)
                prompts.append((li, di, t, key, word, p))

    pad = pad_id(tokenizer)
    results = {}
    reference_texts = None
    bar = common.progress(total=len(prompts) * len(specs), desc="needle", disable=not show_progress)
    for spec in specs:
        hits = [[0] * len(lengths) for _ in depths]
        records = []
        start = time.perf_counter()
        with spec.context(model):
            for li, di, t, key, word, p in prompts:
                new = generate_continuation(model, p["input_ids"], max_new_tokens, pad)
                text = tokenizer.decode(new, skip_special_tokens=True)
                pred = extract_key(text)
                correct = pred == str(key)
                hits[di][li] += correct
                records.append({"length": lengths[li], "depth_percent": depths[di], "trial": t, "key": key,
                                "word": word, "offset": p["offset"], "needle_start": p["needle_start"],
                                "needle_end": p["needle_end"], "actual_depth": round(p["depth"], 4),
                                "generated": text, "predicted": pred, "correct": bool(correct)})
                bar.set_postfix_str(f"{spec.label} {lengths[li]} tok, {depths[di]:g}%: {'ok' if correct else 'miss'}",
                                    refresh=False)
                bar.update(1)
            attention = common.take_stats(model)
        seconds = time.perf_counter() - start
        grid = [[hits[di][li] / trials for li in range(len(lengths))] for di in range(len(depths))]
        texts = [r["generated"] for r in records]
        if reference_texts is None:
            reference_texts = texts
        results[spec.label] = {
            "method": spec.method, "options": spec.options, "accuracy": grid,
            "by_length": [sum(hits[di][li] for di in range(len(depths))) / (trials * len(depths))
                          for li in range(len(lengths))],
            "mean": sum(map(sum, hits)) / len(prompts),
            "same_generation_as_first": sum(a == b for a, b in zip(texts, reference_texts)) / len(prompts),
            "seconds": round(seconds, 2), "attention": attention, "records": records,
        }
    bar.close()
    first = prompts[0][5]
    return {
        "task": "needle",
        "settings": {"lengths": lengths, "depths": depths, "trials": trials, "seed": seed,
                     "max_new_tokens": max_new_tokens, "chat": chat, "insert_needle": insert_needle,
                     "haystack": hay_desc, "haystack_tokens": len(hay_ids), "needle": NEEDLE,
                     "example_prompt_prefix": first["prefix"], "example_prompt_suffix": first["suffix"],
                     "scoring": "exact match: the first run of 7 digits in the continuation equals the key"},
        "methods": results,
    }


# ---------------------------------------------------------------- reporting

def _fmt(x: float) -> str:
    return f"{x:.2f}"


def format_table(result: dict) -> str:
    """Plain-text tables: per method, depth rows x length columns of accuracy."""
    s = result["settings"]
    lengths, depths = s["lengths"], s["depths"]
    lines = [f"needle in a haystack: accuracy (exact match of the 7-digit key), {s['trials']} trial(s) per cell, "
             f"{'chat' if s['chat'] else 'plain'} prompt, haystack: {s['haystack']}"]
    width = max(7, *(len(str(n)) + 1 for n in lengths))
    for label, r in result["methods"].items():
        lines.append(f"\n{label}: mean {r['mean']:.3f}, same generation as first method "
                     f"{r['same_generation_as_first']:.2f}, {r['seconds']:.1f} s")
        lines.append("depth \\ length".ljust(15) + "".join(str(n).rjust(width) for n in lengths))
        for di, d in enumerate(depths):
            lines.append(f"{d:g}%".ljust(15) + "".join(_fmt(a).rjust(width) for a in r["accuracy"][di]))
        lines.append("mean".ljust(15) + "".join(_fmt(a).rjust(width) for a in r["by_length"]))
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    s = result["settings"]
    lengths, depths = s["lengths"], s["depths"]
    out = [f"## Needle in a haystack\n\nExact match of the 7-digit key; {s['trials']} trial(s) per cell, "
           f"{'chat' if s['chat'] else 'plain'} prompt, greedy decoding ({s['max_new_tokens']} new tokens), "
           f"haystack: {s['haystack']}, seed {s['seed']}.\n"]
    summary = [[label] + [_fmt(a) for a in r["by_length"]] + [_fmt(r["mean"]), _fmt(r["same_generation_as_first"])]
               for label, r in result["methods"].items()]
    out.append(common.markdown_table(["method"] + [str(n) for n in lengths] + ["mean", "same output as first"],
                                     summary))
    for label, r in result["methods"].items():
        rows = [[f"{d:g}%"] + [_fmt(a) for a in r["accuracy"][di]] for di, d in enumerate(depths)]
        out.append(f"\n### {label}\n")
        out.append(common.markdown_table(["depth \\ length"] + [str(n) for n in lengths], rows))
    return "\n".join(out) + "\n"


def plot_heatmap(result: dict, path) -> Path:
    """One heatmap panel per method (depth % on y, length on x, accuracy 0..1); returns ``path``."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("the heatmap needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    lengths, depths = s["lengths"], s["depths"]
    methods = list(result["methods"].items())
    fig, axes = plt.subplots(1, len(methods), squeeze=False, sharey=True,
                             figsize=(1.5 + max(2.8, 0.9 * len(lengths)) * len(methods), 1.6 + 0.5 * len(depths)))
    image = None
    for i, (ax, (label, r)) in enumerate(zip(axes[0], methods)):
        image = ax.imshow(r["accuracy"], vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if i == 0:
            ax.set_ylabel("needle depth (%)")
        ax.set_title(f"{label} (mean {r['mean']:.2f})")
        for di in range(len(depths)):
            for li in range(len(lengths)):
                ax.text(li, di, _fmt(r["accuracy"][di][li]), ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), metavar="N",
                        help="prompt lengths in tokens")
    parser.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS), metavar="PCT",
                        help="needle depths in percent of the context")
    parser.add_argument("--trials", type=int, default=3, help="prompts per (length, depth) cell")
    parser.add_argument("--haystack", nargs="+", metavar="SOURCE",
                        help="haystack text: files, directories of .txt/.md files, glob patterns or "
                             "hf:NAME[:CONFIG][@SPLIT] (default: a built-in digit-free filler)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate")
    parser.add_argument("--no-chat", action="store_true",
                        help="plain-text prompt even when the tokenizer has a chat template")
    common.add_common_arguments(parser)


def _warn_context(model, lengths, new_tokens: int = 0) -> None:
    limit = common.max_context(model) if hasattr(model, "config") else None
    if limit and max(lengths) + new_tokens > limit:
        print(f"warning: prompts of up to {max(lengths)} tokens plus {new_tokens} generated ones exceed the "
              f"model's {limit} positions (consider --rope-scaling)", file=sys.stderr)


def run(args) -> int:
    _check_lengths(args.lengths)
    haystack = load_texts(args.haystack) if args.haystack else None  # fails before the model loads
    model, tokenizer, methods, device, dtype = common.setup_from_args(args)
    _warn_context(model, args.lengths, args.max_new_tokens)
    chat = False if args.no_chat else None
    result = evaluate_needle(model, tokenizer, methods, args.lengths, args.depths, args.trials, haystack=haystack,
                             seed=args.seed, max_new_tokens=args.max_new_tokens, chat=chat)
    result["run"] = common.describe_run(model, device, dtype)
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        written = [common.write_json(result, out / "needle.json")]
        (out / "needle.md").write_text(format_markdown(result))
        written.append(out / "needle.md")
        try:
            written.append(plot_heatmap(result, out / "needle.png"))
        except ImportError as exc:
            print(f"no heatmap: {exc}", file=sys.stderr)
        print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv=None) -> int:
    return common.script_main(add_arguments, run, __doc__, argv, prog="eval_needle")


if __name__ == "__main__":
    sys.exit(main())
