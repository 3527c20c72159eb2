#!/usr/bin/env python
"""Build the README's benchmark tables from results/kernels.csv.

Takes, for each GPU, the newest row of every (provider, mode, shape, lengths) and writes Markdown
tables between the ``<!-- results:NAME:start/end -->`` markers of README.md (kernels, e2e-scale and
train-step-scale: the named 8B-class architectures with random weights, e2e: whole-model prefill and
decode of real models, sparse: block-sparse, train-step: the LongLoRA recipe's step, moh: head-routed
attention), or prints them with --print.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout
from attn_patch.benchmarking import read_rows  # noqa: E402
from attn_patch.evals.common import HelpFormatter  # noqa: E402

BASELINES = ["sdpa-flash", "sdpa-cudnn", "flex"]
MARKERS = {"kernels": ("<!-- results:kernels:start -->", "<!-- results:kernels:end -->"),
           "e2e-scale": ("<!-- results:e2e-scale:start -->", "<!-- results:e2e-scale:end -->"),
           "train-step-scale": ("<!-- results:train-step-scale:start -->", "<!-- results:train-step-scale:end -->"),
           "e2e": ("<!-- results:e2e:start -->", "<!-- results:e2e:end -->"),
           "sparse": ("<!-- results:sparse:start -->", "<!-- results:sparse:end -->"),
           "train-step": ("<!-- results:train-step:start -->", "<!-- results:train-step:end -->"),
           "moh": ("<!-- results:moh:start -->", "<!-- results:moh:end -->")}


def _latest(rows, extra=lambda e: e):
    latest = {}
    for r in rows:  # file order is chronological; later rows win
        key = (r["gpu"], r["provider"], r["mode"], extra(r["extra"]), r["batch"], r["q_len"], r["kv_len"], r["dtype"])
        latest[key] = r
    return latest


def _cell(r):
    return f"{float(r['median_ms']):.3f} ms ({float(r['tflops']):.0f})" if r else "-"


def tables(rows) -> str:
    latest = _latest([r for r in rows if r.get("bench", "kernel") == "kernel"])
    out = []
    for gpu in sorted({k[0] for k in latest}):
        groups = sorted({k[2:] for k in latest if k[0] == gpu and k[1] == "attn_patch"},
                        key=lambda g: (g[0], g[1], int(g[2]), int(g[4])))
        if not groups:
            continue
        r0 = next(v for k, v in latest.items() if k[0] == gpu)
        out.append(f"**{gpu}**, torch {r0['torch']}, triton {r0['triton']}, {r0['dtype']}, median of "
                   "`triton.testing.do_bench` (TFLOP/s in brackets; speed-up = baseline time / attn_patch time)\n")
        out.append("| mode | shape | batch | q / kv | attn_patch | SDPA flash | SDPA cuDNN | Flex | "
                   "vs flash | vs cuDNN | vs Flex |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for mode, extra, batch, q, kv, dtype in groups:
            ours = latest[(gpu, "attn_patch", mode, extra, batch, q, kv, dtype)]
            base = {b: latest.get((gpu, b, mode, extra, batch, q, kv, dtype)) for b in BASELINES}
            speed = [f"{float(base[b]['median_ms']) / float(ours['median_ms']):.2f}x" if base[b] else "-"
                     for b in BASELINES]
            shape = f"{ours['heads_q']}/{ours['heads_kv']} heads, d={ours['head_dim']}"
            label = extra.split(",", 1)[1] if "," in extra else ""
            out.append(f"| {mode}{' (' + label + ')' if label else ''} | {shape} | {batch} | {q} / {kv} | "
                       f"{_cell(ours)} | " + " | ".join(_cell(base[b]) for b in BASELINES) + " | "
                       + " | ".join(speed) + " |")
        out.append("")
    return "\n".join(out)


def _extra(row, name):
    for part in row["extra"].split(","):
        if part.startswith(name + "="):
            return float(part.split("=", 1)[1])
    return None


def _model(extra: str) -> str:
    """The model a whole-model row measured: ``model=NAME`` in its extra (older rows: the first part)."""
    first = extra.split(",")[0]
    return first.removeprefix("model=")


def _model_order(name: str):
    """Named architectures first (8B before the rest, in the table's order), then real models."""
    from attn_patch.architectures import ARCHITECTURES

    names = list(ARCHITECTURES)
    arch = name.removeprefix("arch:").split(" ")[0]
    return (0, names.index(arch), name) if name.startswith("arch:") and arch in names else (1, 0, name)


def _error(row, width: int = 90) -> str | None:
    """Why a row did not run, cut to ``width`` characters for a table cell (the row keeps it whole)."""
    text = _extra_text(row, "error")
    if text == "?":
        return None
    # bench e2e summarises a long report as "outer: ... inner"; keep the outer type and the inner error.
    # Rows written before it skipped Inductor's closing advice have that advice as "inner": drop it.
    if len(text) > width and " ... " in text:
        outer, inner = text.split(" ... ", 1)
        outer = outer.split(":", 1)[0]
        text = outer if inner.startswith("Set TORCHDYNAMO") else f"{outer} ({inner.rstrip(':')})"
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def _method_order(m: str):
    return (m not in ("sdpa", "sdpa-flash", "sdpa-cudnn"), ["sdpa", "sdpa-flash", "sdpa-cudnn"].index(m)
            if m in ("sdpa", "sdpa-flash", "sdpa-cudnn") else 0, m)


def _scale(rows, which):
    """The rows of named architectures (which="arch") or of real models (which="real"), or all (None)."""
    if which is None:
        return rows
    return [r for r in rows if _model(r["extra"]).startswith("arch:") == (which == "arch")]


def e2e_tables(rows, which=None) -> str:
    """Whole-model prefill (ms, memory) and decode (tokens/s, dynamic and static cache) per model,
    length and method; the named 8B-class architectures first (``which``: only "arch" or only
    "real" models). A cell that could not run says why; † marks our kernels on fixed launch
    configurations (measured with ATTN_PATCH_AUTOTUNE=0, not the tuned default)."""
    latest = _latest([r for r in _scale(rows, which) if r.get("bench") == "e2e"], extra=_model)
    out = []
    groups = sorted({(k[0], k[3]) for k in latest}, key=lambda g: (_model_order(g[1]), g[0]))
    for gpu, model in groups:
        mine = {k: v for k, v in latest.items() if k[0] == gpu and k[3] == model}
        methods = sorted({k[1] for k in mine}, key=_method_order)
        r0 = next(iter(mine.values()))
        random = model.startswith("arch:")
        out.append(f"**{gpu}**, {model}{': speed and memory only' if random else ''}, torch {r0['torch']}, "
                   f"transformers {r0['transformers']}, {r0['dtype']}, batch 1\n")
        fixed = any("autotune=off" in r["extra"] and not r["provider"].startswith("sdpa") for r in mine.values())

        def cell(mode, m, n):
            return next((v for k, v in mine.items() if k[1] == m and k[2] == mode and int(k[6]) == n), None)

        lengths = sorted({int(k[6]) for k in mine if k[2] == "prefill"})
        base = {n: cell("prefill", "sdpa-flash", n) for n in lengths}
        added = any(_extra(r, "activation_gib") is not None for r in mine.values())
        out.append("Prefill: median ms (speed-up over SDPA-flash; " + ("memory the call adds to the loaded model, "
                   "cache included" if added else "peak GiB") + ")" + ("; † fixed launch configurations "
                   "(ATTN_PATCH_AUTOTUNE=0)" if fixed else "") + "\n")
        out.append("| tokens | " + " | ".join(methods) + " |")
        out.append("|---" * (1 + len(methods)) + "|")
        for n in lengths:
            cells = []
            for m in methods:
                r = cell("prefill", m, n)
                if r is None:
                    cells.append("-")
                elif _error(r):
                    cells.append(f"did not run: {_error(r)}")
                else:
                    ms = float(r["median_ms"])
                    ref = base[n]
                    speed = f"{float(ref['median_ms']) / ms:.2f}x" if ref and ref.get("median_ms") else ""
                    peak = _extra(r, "activation_gib") if added else _extra(r, "peak_gib")
                    gib = "" if peak is None else f"{peak:.2f} GiB" if peak < 10 else f"{peak:.1f} GiB"
                    inner = "; ".join(x for x in (speed, ("+" if added else "") + gib if gib else "") if x)
                    mark = "†" if "autotune=off" in r["extra"] and not m.startswith("sdpa") else ""
                    cells.append(f"{ms:.1f} ms{mark}" + (f" ({inner})" if inner else ""))
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        decode = [(mode, n) for mode in ("decode", "decode-static") for n in sorted({int(k[6]) for k in mine
                                                                                   if k[2] == mode})]
        if decode:
            out.append("\nDecode after the prompt: tokens/s, batch 1, greedy `generate` (dynamic cache: eager; "
                       "static cache: the step compiled by transformers, CUDA graphs)\n")
            out.append("| prompt | cache | " + " | ".join(methods) + " |")
            out.append("|---" * (2 + len(methods)) + "|")
            for mode, n in decode:
                cells = []
                for m in methods:
                    r = cell(mode, m, n)
                    if r is None:
                        cells.append("-")
                    elif _error(r):
                        cells.append(f"did not run: {_error(r)}")
                    else:
                        cells.append(f"{_extra(r, 'tokens_per_s'):.1f}")
                out.append(f"| {n} | {'static' if mode == 'decode-static' else 'dynamic'} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def sparse_tables(rows) -> str:
    """Block-sparse forward (with the gate's cost) and backward per (length, density): ours against
    dense baselines and Flex."""
    latest = {}
    for r in rows:
        if r.get("bench") == "sparse":
            # one row per case and provider, the newest (the achieved density is part of the row)
            case = ",".join(p for p in r["extra"].split(",") if not p.startswith("achieved="))
            latest[(r["gpu"], r.get("mode", "fwd"), r["q_len"], case, r["provider"])] = r
    out = []
    for gpu in sorted({k[0] for k in latest}):
        r0 = next(v for k, v in latest.items() if k[0] == gpu)
        for mode in ("fwd", "bwd"):
            providers = (["sparse", "dense", "sdpa-flash", "sdpa-cudnn", "flex", "gate", "ground-truth"] if mode == "fwd"
                         else ["sparse", "dense", "sdpa-flash", "sdpa-cudnn"])
            cases = sorted({(int(k[2]), k[3]) for k in latest if k[0] == gpu and k[1] == mode and k[4] == "sparse"})
            if not cases:
                continue
            what = "forward" if mode == "fwd" else "backward pass alone"
            out.append(f"**{gpu}**, torch {r0['torch']}, triton {r0['triton']}, {r0['dtype']}, batch 1, "
                       f"{r0['heads_q']}/{r0['heads_kv']} heads, d={r0['head_dim']}, causal, {what}; median ms "
                       "(speed-up of block-sparse over each baseline)\n")
            names = {"sparse": "block-sparse", "dense": "dense (ours)", "sdpa-flash": "SDPA flash",
                     "sdpa-cudnn": "SDPA cuDNN", "flex": "Flex, same block mask", "gate": "gate + selection",
                     "ground-truth": "ground-truth pass"}
            head = ["N", "block density (achieved)"] + [names[p] for p in providers]
            if mode == "fwd":
                head.append("block-sparse + gate vs SDPA flash / cuDNN")
            out.append("| " + " | ".join(head) + " |")
            out.append("|---" * len(head) + "|")
            for n, extra in cases:
                cells = {}
                for p in providers:
                    r = latest.get((gpu, mode, str(n), extra, p))
                    cells[p] = float(r["median_ms"]) if r else None
                fields = dict(part.split("=") for part in latest[(gpu, mode, str(n), extra, "sparse")]["extra"].split(","))
                mine = cells["sparse"]

                def fmt(p, cells=cells, mine=mine):
                    t = cells[p]
                    if t is None:
                        return "-"
                    return f"{t:.2f}" if p in ("sparse", "gate", "ground-truth") else f"{t:.2f} ({t / mine:.2f}x)"

                row = [str(n), f"{fields['density']} ({fields['achieved']})"] + [fmt(p) for p in providers]
                if mode == "fwd":
                    g = cells.get("gate")
                    fa, cu = cells.get("sdpa-flash"), cells.get("sdpa-cudnn")
                    row.append(f"{fa / (mine + g):.2f}x / {cu / (mine + g):.2f}x" if g and fa and cu else "-")
                out.append("| " + " | ".join(row) + " |")
            out.append("")
    return "\n".join(out)


def train_step_tables(rows, which=None) -> str:
    """The recipes' training steps per attention (scripts/bench_train_step.py), per model and length;
    the named 8B-class architectures first (``which`` as for e2e_tables). What did not run says why."""
    latest = _latest([r for r in _scale(rows, which) if r.get("bench") == "train-step"],
                     extra=lambda e: ",".join(p for p in e.split(",") if p.startswith(("model=", "group="))))
    names = {"longlora": "S2-Attn (ours)", "flash": "dense (ours)", "sdpa-flash": "SDPA flash",
             "sdpa-cudnn": "SDPA cuDNN", "seer-distill": "seer gate distillation (frozen model, gates trained)"}
    out = []
    groups = sorted({(k[0], _model(k[3]), int(k[5])) for k in latest},
                    key=lambda g: (_model_order(g[1]), g[0], g[2]))
    for gpu, model, n in groups:
        here = {k[1]: v for k, v in latest.items() if k[0] == gpu and _model(k[3]) == model and int(k[5]) == n}
        s2 = here.get("longlora")
        s2_ms = float(s2["median_ms"]) if s2 and not _error(s2) else None
        r0 = next(iter(here.values()))
        random = model.startswith("arch:")
        out.append(f"**{gpu}**, torch {r0['torch']}, transformers {r0['transformers']}, {model}"
                   f"{' (speed and memory only)' if random and 'random' not in model else ''}, {n} tokens, batch 1, "
                   f"group {_extra_text(r0, 'group')}; median step ms (forward, backward, AdamW) and peak GiB"
                   + ("; † our kernels on fixed launch configurations (ATTN_PATCH_AUTOTUNE=0)"
                      if any("autotune=off" in r["extra"] for r in here.values()) else "") + "\n")
        out.append("| step | time | peak memory | S2 speed-up |")
        out.append("|---|---|---|---|")
        for p in sorted(here, key=lambda p: list(names).index(p) if p in names else 9):
            r = here[p]
            if _error(r):
                out.append(f"| {names.get(p, p)} | did not run: {_error(r)} | | |")
                continue
            ms = float(r["median_ms"])
            speed = f"{ms / s2_ms:.2f}x" if s2_ms and p != "seer-distill" else "-"
            mark = "†" if "autotune=off" in r["extra"] and not p.startswith("sdpa") else ""
            out.append(f"| {names.get(p, p)} | {ms:.1f} ms{mark} | {_extra(r, 'peak_gib'):.2f} GiB | {speed} |")
        out.append("")
    return "\n".join(out)


def moh_tables(rows) -> str:
    """Head-routed (MoH) attention against our dense kernel (scripts/bench_moh.py)."""
    from attn_patch.evals.bench_moh import selection  # the ratio, plus ",shared=0" when no head is shared

    latest = _latest([r for r in rows if r.get("bench") == "moh"], extra=selection)
    out = []
    for gpu in sorted({k[0] for k in latest}):
        mine = {k: v for k, v in latest.items() if k[0] == gpu}
        r0 = next(iter(mine.values()))
        out.append(f"**{gpu}**, torch {r0['torch']}, triton {r0['triton']}, {r0['dtype']}, batch 1, "
                   f"{r0['heads_q']} q / {r0['heads_kv']} KV heads, d={r0['head_dim']}, causal; median ms and, in "
                   "brackets, the time relative to our dense kernel (lower is better). \"moh\" includes compacting "
                   "the head mask; \"masked\" is dense then zeroing the unselected heads (the reference MoH code); "
                   "\"no shared\": every active head routed per token (the predict router's selection), otherwise half "
                   "of them shared (the norm router's)\n")
        unshared = any(k[3].endswith("shared=0") for k in mine)
        extra_cols = [("ratio=0.75,shared=0", "MoH 75%, no shared"), ("ratio=0.5,shared=0", "MoH 50%, no shared")]
        extra_cols = extra_cols if unshared else []
        out.append("| pass | N | dense (ours) | SDPA cuDNN | MoH 75% | MoH 50% | " +
                   "".join(f"{name} | " for _, name in extra_cols) + "masked 50% |")
        out.append("|---|---|---|---|---|---|---|" + "---|" * len(extra_cols))
        for mode in ("fwd", "fwdbwd"):
            for n in sorted({int(k[5]) for k in mine if k[2] == mode}):
                here = {(k[1], k[3]): v for k, v in mine.items() if k[2] == mode and int(k[5]) == n}
                dense = next((v for (p, _), v in here.items() if p == "dense"), None)
                cudnn = next((v for (p, _), v in here.items() if p == "sdpa-cudnn"), None)
                if dense is None:
                    continue
                base = float(dense["median_ms"])

                def rel(r):
                    return f"{float(r['median_ms']):.2f} ms ({float(r['median_ms']) / base:.2f}x)" if r else "-"
                out.append(f"| {'forward' if mode == 'fwd' else 'fwd+bwd'} | {n} | {base:.2f} ms | {rel(cudnn)} | "
                           f"{rel(here.get(('moh', 'ratio=0.75')))} | {rel(here.get(('moh', 'ratio=0.5')))} | "
                           + "".join(f"{rel(here.get(('moh', key)))} | " for key, _ in extra_cols)
                           + f"{rel(here.get(('masked', 'ratio=0.5')))} |")
        out.append("")
    return "\n".join(out)


def _extra_text(row, name):
    for part in row["extra"].split(","):
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
    return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "results" / "kernels.csv"), help="results CSV to read")
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help="README whose tables are rewritten")
    ap.add_argument("--print", action="store_true", help="print the tables instead of editing the README")
    args = ap.parse_args(argv)
    rows = read_rows(args.results)
    texts = {"kernels": tables(rows), "e2e-scale": e2e_tables(rows, "arch"),
             "train-step-scale": train_step_tables(rows, "arch"), "e2e": e2e_tables(rows, "real"),
             "sparse": sparse_tables(rows), "train-step": train_step_tables(rows, "real"), "moh": moh_tables(rows)}
    if args.print:
        print("\n\n".join(texts.values()))
        return
    readme = Path(args.readme)
    body = readme.read_text()
    for name, (start, end) in MARKERS.items():
        if start not in body or end not in body:
            sys.exit(f"{readme} has no {start} ... {end} markers")
        body = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _, t=texts[name]: f"{start}\n{t}\n{end}",
                      body, flags=re.S)
    readme.write_text(body)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
