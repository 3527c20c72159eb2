"""The top-level kernels/ folder must never shadow Hugging Face's ``kernels`` library (which
transformers >= 5.25 imports at ``import transformers``), and ``attn_patch.kernels`` must work from a
checkout, an editable install and a wheel."""
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, sys
spec = importlib.util.find_spec("kernels")
import attn_patch, attn_patch.kernels as k
from attn_patch.kernels import flash_attention, attention_reference
import attn_patch.kernels.reference as ref
print(json.dumps({"kernels": spec.origin if spec else None, "attn_patch": attn_patch.__file__,
                  "reference": ref.__file__}))
"""


def _hf_kernels_origin() -> str | None:
    """Where ``import kernels`` resolves from a folder that holds no kernels/ (None: not installed)."""
    out = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels');"
                          "print(s.origin if s and s.origin else '')"], cwd="/", capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() or None  # a namespace package (no origin) is not Hugging Face's library


def _probe(cwd, env=None, prelude="") -> dict:
    import json

    run = subprocess.run([sys.executable, "-c", prelude + PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_kernels_folder_is_not_a_top_level_package():
    assert (ROOT / "kernels" / "reference.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes `import kernels` from the repository root find this folder instead of "
        "Hugging Face's kernels library")


def test_import_from_repository_root_sees_hf_kernels():
    hf = _hf_kernels_origin()
    found = _probe(ROOT)
    if hf is not None:
        assert found["kernels"] == hf
    assert found["kernels"] is None or Path(found["kernels"]).parent != ROOT / "kernels"
    assert Path(found["reference"]) == ROOT / "kernels" / "reference.py"
    # transformers imports HF's kernels at import time: from the root it must import cleanly
    run = subprocess.run([sys.executable, "-c", "from transformers import LlamaForCausalLM; import attn_patch"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_plain_checkout_without_install(tmp_path):
    """PYTHONPATH=<checkout>, from another folder, with any editable-install finder taken away."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    prelude = ("import sys\n"
               "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n")
    found = _probe(tmp_path, env=env, prelude=prelude)
    assert Path(found["attn_patch"]).parent == ROOT / "attn_patch"
    assert Path(found["reference"]) == ROOT / "kernels" / "reference.py"


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building a wheel needs setuptools")
def test_wheel_installs_kernels_under_attn_patch_only(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("attn_patch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("kernels/")], "the wheel must not install a top-level kernels"
    assert "attn_patch/kernels/__init__.py" in names and "attn_patch/kernels/flash.py" in names
    assert any(n.startswith("attn_patch/seer/gates/") and n.endswith(".safetensors") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    hf = _hf_kernels_origin()
    env = dict(os.environ, PYTHONPATH=str(site))
    prelude = ("import sys\n"
               "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n")
    found = _probe(tmp_path, env=env, prelude=prelude)
    assert Path(found["reference"]) == site / "attn_patch" / "kernels" / "reference.py"
    if hf is not None:
        assert found["kernels"] == hf
