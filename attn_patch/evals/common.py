"""What every evaluation shares: method specs, model loading, result files."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import architectures
from ..errors import ConfigError
from ..models import (check_device, is_terminal, load_default_model, parse_rope_scaling, quiet_loading_bars,
                      with_rope_scaling)

# the unpatched model (whatever attention it was loaded with: SDPA by default); "sdpa-<backend>"
# pins one SDPA backend, as the benchmarks' baselines do
ORIGINAL = ("sdpa", "original")
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}


@dataclass(frozen=True)
class MethodSpec:
    """One configuration to evaluate: ``method`` None means the original model (optionally with one
    pinned SDPA backend)."""

    label: str
    method: str | None = None
    options: dict = field(default_factory=dict)
    sdpa_backend: str | None = None

    @contextlib.contextmanager
    def context(self, model):
        """Patch ``model`` (or pin the SDPA backend) for the duration of a ``with`` block."""
        with contextlib.ExitStack() as stack:
            if self.sdpa_backend is not None:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([getattr(SDPBackend, self.sdpa_backend)]))
            if self.method is not None:
                import attn_patch

                stack.enter_context(attn_patch.patched(model, self.method, **self.options))
            yield model


def take_stats(model) -> dict | None:
    """What the patched method measured since the last call (seer: achieved block density overall
    and per layer, sparse / dense call counts; moh: active-head ratio and per-head utilisation per
    layer), then reset; None when there is nothing to report."""
    import attn_patch

    if not isinstance(model, torch.nn.Module):  # a stand-in with only generate() (the evals need no more)
        return None
    state = attn_patch.patch_state(model)
    if state is not None and state.method == "moh":
        st = attn_patch.stats(model, reset=True)
        return {"active": st["active"], "shared": st["shared"], "top_k": st["top_k"], "router": st["router"],
                "heads_per_layer": st["heads_per_layer"],
                "layer_utilisation": [layer["utilisation"] for layer in st["layers"]]}
    if state is None or state.method != "seer":
        return None
    st = attn_patch.stats(model, reset=True)
    return {"density": st["density"], "layer_density": [layer["density"] for layer in st["layers"]],
            "sparse_calls": sum(layer["sparse_calls"] for layer in st["layers"]),
            "dense_calls": sum(layer["dense_calls"] for layer in st["layers"]), "selection": st["config"]}


def parse_method(text: str) -> MethodSpec:
    """``"sdpa"`` (the original model), ``"flash"``, or ``"name:opt=value,opt=value"``.

    Values are read as JSON when they parse (numbers, true/false, null), else as strings. The method
    name and its options are checked here, so a typo fails before any model is loaded.
    """
    from ..registry import get_method

    name, _, rest = text.strip().partition(":")
    if name in ORIGINAL or name in SDPA_BACKENDS:
        if rest:
            raise ConfigError(f"{text!r}: the original model ({name}) takes no options")
        return MethodSpec(label=name, sdpa_backend=SDPA_BACKENDS.get(name))
    method = get_method(name)  # ConfigError naming the available methods
    options = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = pair.partition("=")
        if not eq:
            raise ConfigError(f"{text!r}: options are written name=value, got {pair!r}")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    method.config_class.from_options(name, options)  # validates names, types and values
    return MethodSpec(label=text.strip(), method=name, options=options)


def parse_methods(texts: list[str] | None, default: tuple[str, ...] = ("sdpa", "flash")) -> list[MethodSpec]:
    specs = [parse_method(t) for t in (texts or default)]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"a method is listed twice: {labels}")
    return specs


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"dtype {name!r}: use float32, bfloat16 or float16")
    return dtype


def load_model(model: str | os.PathLike | None = None, *, device: str | None = None, dtype="float32",
               rope_scaling: str | dict | None = None):
    """(model, tokenizer) from a Hugging Face folder / hub name, a .gguf file, (None) the embedded
    SmolLM2, or ``arch:NAME`` (a named architecture with seeded random weights, built on the device,
    for speed and memory only: :mod:`attn_patch.architectures`). ``rope_scaling`` is "linear:4",
    "yarn:4", "theta:1e6:4"... or a dict, for contexts beyond the model's trained length."""
    device = str(check_device(device or default_device()))
    dtype = resolve_dtype(dtype)
    scaling = parse_rope_scaling(rope_scaling)
    if architectures.is_arch(model):
        return architectures.build_model(model, device=device, dtype=dtype, rope_scaling=scaling)
    if model is None or str(model).endswith(".gguf"):
        return load_default_model(model, dtype=dtype, device=device, rope_scaling=scaling)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model)
    if scaling:
        config = with_rope_scaling(config, scaling)
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with quiet_loading_bars():
        loaded = AutoModelForCausalLM.from_pretrained(model, config=config, dtype=dtype, attn_implementation="sdpa")
    return loaded.to(device).eval(), tokenizer


def max_context(model) -> int | None:
    """The longest context the model is set up for: its position limit, times the factor of a dynamic
    NTK RoPE (which keeps ``max_position_embeddings`` at the trained length and rescales beyond it)."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    rope = getattr(config, "rope_parameters", None) or {}
    if limit and rope.get("rope_type") == "dynamic":
        limit = int(limit * rope.get("factor", 1.0))
    return limit


def model_name(model) -> str:
    """How results name a model: ``arch:NAME (random weights)`` for a named architecture, else its
    file, folder or hub name (or its model type)."""
    name = str(getattr(model.config, "name_or_path", "") or model.config.model_type)
    return f"{name} (random weights)" if architectures.is_arch(name) else name


def describe_run(model, device: str, dtype) -> dict:
    """Environment and model facts stored with every result file."""
    from ..benchmarking import environment

    info = environment()
    info.update(model=model_name(model),
                model_type=model.config.model_type, device=str(device), dtype=str(dtype).replace("torch.", ""),
                rope_parameters=getattr(model.config, "rope_parameters", None),
                max_position_embeddings=getattr(model.config, "max_position_embeddings", None),
                max_context=max_context(model))
    return info


def write_json(data, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(iterable=None, *, total=None, desc: str = "", disable: bool = False, file=None, initial: int = 0,
             **tqdm_options):
    """Progress of a loop, to ``file`` (default stderr): a tqdm bar on a terminal (or in a notebook);
    elsewhere (a log file, a pipe, tqdm not installed) a plain line at most 20 times over the run,
    never redrawn. Used as ``bar.set_postfix_str(note); bar.update(n)``, then ``bar.close()``."""
    file = file if file is not None else sys.stderr
    if disable:
        return iterable if iterable is not None else _NoBar()
    if iterable is not None and total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if is_terminal(file):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, total=total, desc=desc, file=file, initial=initial, **tqdm_options)
    bar = LineProgress(total, desc, file, initial=initial)
    return bar.wrap(iterable) if iterable is not None else bar


class LineProgress:
    """Progress as plain lines (``passkey 3/20 (15%) 0:42: flash 1024 tok: ok``), one each twentieth
    of the total (every step when the total is unknown) and one at the last step; each line is
    written once, so a log holds no redraws."""

    def __init__(self, total: int | None, desc: str, file, *, initial: int = 0):
        self.total, self.desc, self.file = total, desc, file
        self.every = max(1, (total or 0) // 20)
        self.n, self.note = initial, ""
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.n // self.every > before // self.every or self.n == self.total:
            self.file.write(self.line() + "\n")
            self.file.flush()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.note = text  # shown with the next line written

    def line(self) -> str:
        minutes, seconds = divmod(int(time.perf_counter() - self.start), 60)
        count = f"{self.n}/{self.total} ({100 * self.n // self.total}%)" if self.total else str(self.n)
        return f"{self.desc} {count} {minutes}:{seconds:02d}" + (f": {self.note}" if self.note else "")

    def wrap(self, iterable):
        for item in iterable:
            yield item
            self.update(1)

    def close(self) -> None:
        pass


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, text="", refresh=True):
        pass

    def close(self):
        pass


def add_common_arguments(parser, *, default_methods: tuple[str, ...] = ("sdpa", "flash")) -> None:
    """--model, --method, --device, --dtype, --rope-scaling, --out, --seed: the same on every subcommand."""
    parser.add_argument("--model", help="Hugging Face model folder or hub name, a .gguf file, or a named architecture "
                                        "with random weights for speed and memory only (arch:llama-3.1-8b, "
                                        f"{', '.join('arch:' + n for n in list(architectures.ARCHITECTURES)[1:])}) "
                                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--method", action="append", metavar="SPEC",
                        help="configuration to evaluate, repeatable: 'sdpa' (the original model; "
                             "'sdpa-flash' / 'sdpa-cudnn' pin its SDPA backend), 'flash', or "
                             "'NAME:opt=value,opt=value' (options from `attn-patch methods`) "
                             f"(default: {', '.join(default_methods)})")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--rope-scaling", metavar="TYPE:FACTOR",
                        help="RoPE scaling for contexts beyond the trained length: linear:4, dynamic:4, yarn:4, "
                             "llama3:4, ntk:4, theta:1e6:4 (rotary base 1e6, 4x the context), or a JSON object "
                             "of RoPE parameters")
    parser.add_argument("--out", metavar="DIR", help="write JSON / Markdown (/ PNG) results into this folder")
    parser.add_argument("--seed", type=int, default=0, help="base random seed")
    parser.set_defaults(default_methods=default_methods)


def setup_from_args(args):
    """(model, tokenizer, methods, device, dtype) for parsed common arguments; methods are checked first."""
    methods = parse_methods(args.method, args.default_methods)
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    model, tokenizer = load_model(args.model, device=device, dtype=dtype, rope_scaling=args.rope_scaling)
    return model, tokenizer, methods, device, dtype


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as plain text: module docstrings kept as laid out but without their reST markup, and each
    option's default shown once: appended unless the help already speaks of it, left out where it is
    None or False (nothing to tell)."""

    def _fill_text(self, text, width, indent):
        text = plain_text(text)
        if "\n" not in text.strip():  # a one-line description: wrapped to the width
            return argparse.HelpFormatter._fill_text(self, text, width, indent)
        return super()._fill_text(text, width, indent)

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)  # keeps --rope-scaling whole

    def _get_help_string(self, action):
        text = plain_text(action.help or "")
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or _DEFAULT_RE.search(text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


_DEFAULT_RE = re.compile(r"\bdefault\b", re.IGNORECASE)
_REST_ROLE_RE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


def plain_text(text: str) -> str:
    """``text`` without reST markup: roles such as :func:`name` and inline literals in double
    backquotes become the plain words, a paragraph's closing "::" (a literal block follows) one colon."""
    text = _REST_ROLE_RE.sub(r"\1", text)
    text = text.replace("``", "")
    return re.sub(r"::$", ":", text, flags=re.MULTILINE)


def run_args(run, args, prog: str) -> int:
    """``run(args)``, with a bad input (ConfigError, missing file) printed as one line and exit code 2."""
    try:
        return run(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def script_main(add_arguments, run, description: str | None, argv=None, prog: str | None = None) -> int:
    """What every eval / bench module's ``main`` does: parse ``argv`` with its arguments and run."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_arguments(parser)
    return run_args(run, parser.parse_args(argv), parser.prog)
