"""Make ``attn_patch.kernels`` importable from a plain source checkout.

An installed attn_patch (wheel or ``pip install -e .``) maps the top-level ``kernels/`` folder to
``attn_patch.kernels``. Running from a checkout that was not installed (``PYTHONPATH=.``, a GPU
box with no build tools) finds ``attn_patch/`` but not the mapping, so load the folder under that
name here. Nothing is ever installed as a top-level ``kernels`` module.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def mount_kernels() -> None:
    name = "attn_patch.kernels"
    if name in sys.modules:
        return
    package_dir = Path(__file__).resolve().parent
    if (package_dir / "kernels").is_dir():  # installed wheel layout
        return
    source = package_dir.parent / "kernels" / "__init__.py"
    if not source.is_file():
        return
    try:
        if importlib.util.find_spec(name) is not None:  # an editable install's finder maps it
            return
    except ModuleNotFoundError:
        pass
    spec = importlib.util.spec_from_file_location(name, source, submodule_search_locations=[str(source.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
