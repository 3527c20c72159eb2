"""Perplexity of the original and patched model on long text, per context length.

Each document is tokenised once (no special tokens, no truncation) and cut into windows of exactly
``L`` tokens for every context length ``L``:

* default: non-overlapping windows per document; the short tail (< L tokens) is dropped, so every
  window carries a full ``L`` tokens of context and a document shorter than ``L`` contributes nothing;
* ``stride=S`` (S < L): sliding windows ``[0, L), [S, S + L), ...``; each window scores only its last
  ``S`` tokens (the first window of a document scores all of its tokens), so every token up to the
  end of the last window is scored exactly once, with at least ``L - S`` tokens of context after
  the first window. A stride >= L means non-overlapping windows for that length;
* ``concat=True``: all documents joined into one stream (EOS between them) before cutting, as in
  LongLoRA's evaluation.

Within a window the first token is never predicted. Perplexity is ``exp(total NLL / predicted
tokens)`` per (method, length). The NLL is computed from the base model's last hidden states and
the output embedding in chunks of positions, with an fp32 cross-entropy, so the ``[L, vocab]`` fp32
logits of a window never exist at once. Every method sees exactly the same windows.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .common import (add_common_arguments, describe_run, markdown_table, max_context, parse_method, take_stats,
                     parse_methods, progress, script_main, setup_from_args, write_json)
from .text import Document, load_texts

DEFAULT_LENGTHS = (2048, 4096, 8192)
CHUNK = 1024  # positions per output-embedding / cross-entropy chunk

# Config attributes that change the logits after the output embedding and that this evaluation does
# not reproduce; a model setting one is refused rather than scored wrongly.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("logits_scaling", "logit_scale", "output_multiplier_scale")


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` of stream ``stream``; the targets scored are positions ``[first_target, end)``
    (each predicted from the tokens before it inside the window)."""

    stream: int
    start: int
    end: int
    first_target: int

    @property
    def n_predicted(self) -> int:
        return self.end - self.first_target


# ---------------------------------------------------------------------------------------------
# windows


def tokenize_documents(tokenizer, documents: list[Document]) -> list[list[int]]:
    """Token ids of each document: no special tokens, no truncation, and no "longer than the
    maximum length" warning (long documents are the point here)."""
    out = []
    for doc in documents:
        ids = tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
        out.append(list(ids))
    return out


def build_streams(token_lists: list[list[int]], *, concat: bool = False, eos_token_id: int | None = None
                  ) -> list[torch.Tensor]:
    """One int64 tensor per document, or (``concat``) a single stream with EOS between documents."""
    if not concat:
        return [torch.tensor(ids, dtype=torch.long) for ids in token_lists]
    if eos_token_id is None:
        raise ConfigError("concat joins documents with the EOS token, but the tokenizer has no eos_token_id")
    joined: list[int] = []
    for i, ids in enumerate(token_lists):
        if i:
            joined.append(int(eos_token_id))
        joined.extend(ids)
    return [torch.tensor(joined, dtype=torch.long)]


def make_windows(stream_lengths: list[int], length: int, stride: int | None = None) -> list[Window]:
    """Windows of exactly ``length`` tokens over streams of the given lengths (see the module doc)."""
    if length < 2:
        raise ConfigError(f"context length {length}: a window needs at least 2 tokens")
    if stride is not None and stride < 1:
        raise ConfigError(f"stride {stride}: use a positive number of tokens")
    windows = []
    for s, n in enumerate(stream_lengths):
        if stride is None or stride >= length:
            for start in range(0, n - length + 1, length):
                windows.append(Window(s, start, start + length, start + 1))
        else:
            for start in range(0, n - length + 1, stride):
                end = start + length
                windows.append(Window(s, start, end, start + 1 if start == 0 else end - stride))
    return windows


def select_windows(windows: list, max_windows: int | None) -> list:
    """At most ``max_windows`` windows, evenly spread over the list (deterministic, order kept)."""
    n = len(windows)
    if max_windows is None or n <= max_windows:
        return list(windows)
    return [windows[(2 * i + 1) * n // (2 * max_windows)] for i in range(max_windows)]


def _check_settings(lengths, stride, max_windows, batch_size) -> list[int]:
    lengths = list(dict.fromkeys(int(n) for n in lengths))  # duplicates dropped, order kept
    if not lengths:
        raise ConfigError("no context lengths given (e.g. --lengths 2048 4096)")
    short = [n for n in lengths if n < 2]
    if short:
        raise ConfigError(f"context lengths {short}: a window needs at least 2 tokens (one to predict from)")
    if stride is not None and stride < 1:
        raise ConfigError(f"stride {stride}: use a positive number of tokens (or no stride for non-overlapping "
                          "windows)")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows {max_windows}: use at least 1 (or none for every window)")
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size}: use at least 1")
    return lengths


# ---------------------------------------------------------------------------------------------
# scoring


def _logit_softcap(model) -> float | None:
    config = model.config
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1:
            raise ConfigError(f"{config.model_type}: config.{name}={value} rescales the logits after the output "
                              "embedding, which the perplexity evaluation does not reproduce")
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    out = model.base_model(input_ids=input_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def window_nll(model, input_ids: torch.Tensor, first_offsets: list[int], *, chunk: int = CHUNK,
               softcap: float | None = None) -> list[float]:
    """Summed NLL per window of ``input_ids`` ``[B, L]``; window ``b`` scores tokens ``first_offsets[b]:``
    (offsets inside the window, >= 1). Call under ``torch.inference_mode()``."""
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no output embedding: the perplexity evaluation needs a "
                          "causal language model (a ...ForCausalLM class)")
    hidden = _hidden_states(model, input_ids)
    sums = []
    for b, offset in enumerate(first_offsets):
        h = hidden[b, offset - 1:-1]  # position p predicts token p + 1
        targets = input_ids[b, offset:]
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for a in range(0, targets.numel(), chunk):
            logits = head(h[a:a + chunk]).float()
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            total += F.cross_entropy(logits, targets[a:a + chunk], reduction="sum").double()
        sums.append(total)
    return torch.stack(sums).tolist()


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _ppl(nll: float, tokens: int) -> float:
    try:
        return math.exp(nll / tokens)
    except OverflowError:
        return float("inf")


def evaluate_perplexity(model, tokenizer, documents: list[Document], lengths, methods, *, stride: int | None = None,
                        concat: bool = False, max_windows: int | None = None, batch_size: int = 1,
                        show_progress: bool = True, allow_beyond_context: bool = False) -> dict:
    """Perplexity of every method at every context length, on the same windows (see the module doc).

    ``methods``: MethodSpecs (or spec strings such as ``"sdpa"``, ``"flash:backend=reference"``).
    Returns a JSON-able dict: ``settings``, ``methods``, ``windows`` (per length: available, used,
    stride, predicted tokens) and ``results[label][str(length)] = {ppl, nll, tokens, windows, seconds}``.
    """
    lengths = _check_settings(lengths, stride, max_windows, batch_size)
    methods = [parse_method(m) if isinstance(m, str) else m for m in methods]
    if not methods:
        raise ConfigError("no methods to evaluate (e.g. sdpa and flash)")
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"a method is listed twice: {labels}")
    if not documents:
        raise ConfigError("no documents to evaluate on")
    limit = max_context(model)
    beyond = [n for n in lengths if limit and n > limit]
    if beyond and not allow_beyond_context:
        raise ConfigError(f"context lengths {beyond} are beyond the model's {limit} positions "
                          f"(max_position_embeddings); extend it with --rope-scaling (e.g. "
                          f"--rope-scaling linear:{math.ceil(max(beyond) / limit)}) or use shorter lengths")
    softcap = _logit_softcap(model)

    token_lists = tokenize_documents(tokenizer, documents)
    streams = build_streams(token_lists, concat=concat, eos_token_id=getattr(tokenizer, "eos_token_id", None))
    stream_lengths = [int(s.numel()) for s in streams]
    longest = max(stream_lengths)

    too_long = [n for n in lengths if n > longest]
    if too_long:
        what = (f"context length {too_long[0]} is" if len(too_long) == 1
                else f"context lengths {', '.join(map(str, too_long))} are")
        where = f"the joined text ({longest} tokens)" if concat else f"every document (longest: {longest} tokens)"
        raise ConfigError(f"{what} longer than {where}; use shorter --lengths or more / longer text"
                          + ("" if concat else " (or --concat to join the documents)"))
    plan: dict[int, list[Window]] = {}
    info: dict[str, dict] = {}
    for n in lengths:
        available = make_windows(stream_lengths, n, stride)
        used = select_windows(available, max_windows)
        plan[n] = used
        info[str(n)] = {"available": len(available), "used": len(used),
                        "stride": stride if stride is not None and stride < n else None,
                        "documents": len({w.stream for w in used}),
                        "predicted_tokens": sum(w.n_predicted for w in used)}

    device = _model_device(model)
    results: dict[str, dict] = {}
    bar = progress(total=len(methods) * sum(len(w) for w in plan.values()), desc="perplexity", unit="window",
                   disable=not show_progress, file=sys.stderr)
    try:
        for spec in methods:
            per_length = results.setdefault(spec.label, {})
            with spec.context(model):
                for n, windows in plan.items():
                    bar.set_postfix_str(f"{spec.label} L={n}", refresh=False)
                    nll, tokens = 0.0, 0
                    start_time = time.perf_counter()
                    for i in range(0, len(windows), batch_size):
                        batch = windows[i:i + batch_size]
                        ids = torch.stack([streams[w.stream][w.start:w.end] for w in batch]).to(device)
                        with torch.inference_mode():
                            sums = window_nll(model, ids, [w.first_target - w.start for w in batch], softcap=softcap)
                        nll += sum(sums)
                        tokens += sum(w.n_predicted for w in batch)
                        bar.update(len(batch))
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    per_length[str(n)] = {"ppl": _ppl(nll, tokens), "nll": nll, "tokens": tokens,
                                          "windows": len(windows), "seconds": time.perf_counter() - start_time}
                    attention = take_stats(model)
                    if attention is not None:
                        per_length[str(n)]["attention"] = attention
    finally:
        bar.close()

    return {
        "eval": "perplexity",
        "settings": {"lengths": lengths, "stride": stride, "concat": concat, "max_windows": max_windows,
                     "batch_size": batch_size, "documents": len(documents),
                     "document_tokens": sum(len(t) for t in token_lists),
                     "longest_document": max(len(t) for t in token_lists), "special_tokens": False},
        "methods": [{"label": m.label, "method": m.method, "options": dict(m.options)} for m in methods],
        "windows": info,
        "results": results,
    }


# ---------------------------------------------------------------------------------------------
# output


def _describe_windows(result: dict) -> str:
    s = result["settings"]
    kind = f"sliding windows, stride {s['stride']}" if s.get("stride") else "non-overlapping windows"
    scope = "documents joined with EOS" if s.get("concat") else "per document"
    cap = f", at most {s['max_windows']} windows per length" if s.get("max_windows") else ""
    docs = f"{s['documents']} document" + ("s" if s["documents"] != 1 else "")
    return f"{kind}, {scope}{cap}; {docs}, {s['document_tokens']} tokens (longest {s['longest_document']})"


def _rows(result: dict) -> tuple[list[str], list[list[str]]]:
    labels = [m["label"] for m in result["methods"]]
    header = ["length", "windows", "tokens"] + labels
    rows = []
    for n in result["settings"]["lengths"]:
        key = str(n)
        win = result["windows"][key]
        row = [str(n), str(win["used"]), str(win["predicted_tokens"])]
        base = result["results"][labels[0]][key]["ppl"]
        for i, label in enumerate(labels):
            ppl = result["results"][label][key]["ppl"]
            cell = f"{ppl:.2f}"
            if i:
                cell += f" (x{ppl / base:.3f})" if base and math.isfinite(base) else " (x-)"
            row.append(cell)
        rows.append(row)
    return header, rows


def format_table(result: dict) -> str:
    """Plain-text table: one row per context length, one column of perplexity per method (after the
    first, with its ratio to the first method's)."""
    header, rows = _rows(result)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = "perplexity (lower is better): " + _describe_windows(result)
    return title + "\n" + "\n".join(lines)


def to_markdown(result: dict) -> str:
    header, rows = _rows(result)
    parts = ["## Perplexity", "", _describe_windows(result) + "."]
    run = result.get("run")
    if run:
        device = str(run.get("device", ""))
        where = f"{device}, {run['gpu']}" if device.startswith("cuda") and run.get("gpu") else device
        parts.append(f"Model `{run.get('model')}` ({run.get('dtype')}, {where}); torch {run.get('torch')}, "
                     f"transformers {run.get('transformers')}; {run.get('date')}.")
    parts += ["", "Perplexity (lower is better); after the first method, the ratio to the first.", "",
              markdown_table(header, rows)]
    return "\n".join(parts) + "\n"


def write_outputs(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``perplexity.json`` and ``perplexity.md`` in ``out_dir``."""
    out_dir = Path(out_dir)
    json_path = write_json(result, out_dir / "perplexity.json")
    md_path = out_dir / "perplexity.md"
    md_path.write_text(to_markdown(result))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="SOURCE",
                        help="text to evaluate on: files, directories (their .txt/.md files), glob patterns, or "
                             "hf:NAME[:CONFIG][@SPLIT] for a datasets dataset")
    parser.add_argument("--text-field", default="text", help="column holding the text of a dataset")
    parser.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS), metavar="L",
                        help="context lengths in tokens")
    parser.add_argument("--stride", type=int, metavar="S",
                        help="sliding windows: each L-token window scores only its last S tokens (a document's first "
                             "window all of them); lengths L <= S get non-overlapping windows (default: "
                             "non-overlapping windows at every length)")
    parser.add_argument("--concat", action="store_true",
                        help="join all documents (EOS between) into one stream before cutting windows")
    parser.add_argument("--max-windows", type=int, metavar="N",
                        help="at most N windows per length, evenly spread over the text (default: all)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--allow-beyond-context", action="store_true",
                        help="allow lengths beyond the model's max_position_embeddings without --rope-scaling")
    add_common_arguments(parser)


def run(args) -> int:
    parse_methods(args.method, args.default_methods)  # a typo fails before anything loads
    _check_settings(args.lengths, args.stride, args.max_windows, args.batch_size)
    documents = load_texts(args.data, text_field=args.text_field)
    model, tokenizer, methods, device, dtype = setup_from_args(args)
    torch.manual_seed(getattr(args, "seed", 0) or 0)
    result = evaluate_perplexity(model, tokenizer, documents, args.lengths, methods, stride=args.stride,
                                 concat=args.concat, max_windows=args.max_windows, batch_size=args.batch_size,
                                 allow_beyond_context=getattr(args, "allow_beyond_context", False))
    result["run"] = describe_run(model, device, dtype)
    result["run"]["data"] = list(args.data)
    print(format_table(result))
    if args.out:
        json_path, md_path = write_outputs(result, args.out)
        print(f"wrote {json_path} and {md_path}")
    return 0


def main(argv=None) -> int:
    return script_main(add_arguments, run, __doc__, argv, prog="eval_perplexity")


if __name__ == "__main__":
    sys.exit(main())
