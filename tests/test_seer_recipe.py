"""recipes/seer_distill.py on a tiny model on CPU: the loss falls, the gates load, resume is exact."""
import json
import os
import shutil
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from tiny_models import build, load_script, word_tokenizer

import attn_patch
from attn_patch.seer import gates_of

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "seer_distill.py"
BOOK = ROOT.parent / "shared" / "data" / "books" / "moby_dick.txt"


def _recipe():
    return load_script(RECIPE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer, saved as a model folder, and a training text."""
    root = tmp_path_factory.mktemp("distill")
    text = BOOK.read_text()[:120_000] if BOOK.is_file() else " ".join(f"w{i % 90} w{(i * 7) % 90}" for i in range(20000))
    (root / "train.txt").write_text(text)
    torch.manual_seed(0)
    model = build("llama")
    with torch.no_grad():  # sharper attention than random init gives, so the gates have a pattern to learn
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    model.save_pretrained(root / "model")
    word_tokenizer(text, 96).save_pretrained(root / "model")
    return root


def _args(tiny, out, *extra):
    return ["--model", str(tiny / "model"), "--data", str(tiny / "train.txt"), "--seq-len", "128",
            "--block-size", "16", "--lr", "3e-2", "--warmup", "2", "--log-every", "2", "--save-every", "4",
            "--out", str(out), "--calibrate-windows", "0", *extra]


def _distill_loss(tiny, gates):
    """The distillation loss of ``gates`` on every 10th window of the training text."""
    recipe = _recipe()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attn_patch.evals.text import load_texts

    model = AutoModelForCausalLM.from_pretrained(tiny / "model")
    windows = recipe.token_windows(AutoTokenizer.from_pretrained(tiny / "model"),
                                   load_texts(str(tiny / "train.txt")), 128)[::10]
    with attn_patch.patched(model, "seer", distill=True, gates=str(gates)), torch.no_grad():
        model(windows, use_cache=False)
        return float(sum(attn_patch.seer.distill_losses(model)))


def test_distillation_lowers_the_loss_and_saves_loadable_gates(tiny, tmp_path):
    recipe = _recipe()
    start, out = tmp_path / "start", tmp_path / "run"
    assert recipe.main(_args(tiny, start, "--steps", "0")) == 0  # the initial gates
    assert recipe.main(_args(tiny, out, "--steps", "100", "--lr", "1e-2", "--calibrate-windows", "3")) == 0
    before, after = _distill_loss(tiny, start), _distill_loss(tiny, out)
    assert after < 0.8 * before, (before, after)  # about 0.58 -> 0.31
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and log[-1]["step"] == 100 and len(log[-1]["layer_loss"]) == 2
    meta = json.loads((out / "config.json").read_text())
    assert meta["training"]["step"] == 100 and meta["training"]["tokens"] == 100 * 128
    cal = json.loads((out / "calibration.json").read_text())  # the gates come calibrated
    assert cal["windows"] == 3 and len(cal["kept"]) == 2 and len(cal["layer_loss"]["delta"]) == 2
    model = build("llama")
    attn_patch.apply(model, "seer", gates=str(out), density=0.6, min_length=0)
    with torch.no_grad():
        model(torch.randint(1, 96, (1, 64)))
    st = attn_patch.stats(model)
    assert st["density"] is not None and st["config"]["allocation"] == "calibrated" and len(st["budget"]) == 2


def test_resume_continues_exactly(tiny, tmp_path):
    recipe = _recipe()
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    assert recipe.main(_args(tiny, straight, "--steps", "8")) == 0
    assert recipe.main(_args(tiny, sliced, "--steps", "8", "--stop-at", "5")) == 0
    assert not (sliced / "gates.safetensors").exists() and (sliced / "checkpoint" / "trainer_state.pt").exists()
    assert recipe.main(_args(tiny, sliced, "--steps", "8", "--resume")) == 0
    a, b = build("llama"), build("llama")
    attn_patch.apply(a, "seer", gates=str(straight))
    attn_patch.apply(b, "seer", gates=str(sliced))
    for ga, gb in zip(gates_of(a), gates_of(b)):
        torch.testing.assert_close(ga.k_weight, gb.k_weight, rtol=1e-5, atol=1e-6)


def test_refuses_evaluation_text(tiny, tmp_path):
    held = tmp_path / "pride_and_prejudice.txt"
    shutil.copy(tiny / "train.txt", held)
    with pytest.raises(SystemExit, match="held out"):
        _recipe().main(["--model", str(tiny / "model"), "--data", str(held), "--out", str(tmp_path / "x")])


def test_two_process_data_parallel_launch(tiny, tmp_path):
    """Two processes under torchrun (what `accelerate launch` with the DDP config starts on GPUs; on
    CPU accelerate runs DDP over gloo): ranks take different windows and the all-reduced gates train."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           str(RECIPE), *_args(tiny, out, "--steps", "6")]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on CPU
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((out / "config.json").read_text())
    assert meta["training"]["processes"] == 2 and meta["training"]["tokens"] == 6 * 128 * 2
    from attn_patch.training import window_index

    seen = [window_index(m, r, 2, 1, 201, 0)[0] for m in range(6) for r in range(2)]
    assert len(set(seen)) == len(seen)  # no window twice in an epoch, across ranks
