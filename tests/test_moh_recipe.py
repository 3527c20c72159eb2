"""recipes/moh_train.py on a tiny model on CPU: the loss falls, the saved model + routers reproduce the
trained MoH model, resume is exact, the dense baseline and learned routers train, DDP runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build, load_script, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "recipes" / "moh_train.py"
BOOK = ROOT.parent / "shared" / "data" / "books" / "moby_dick.txt"
SEQ = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("moh")
    text = BOOK.read_text()[:60_000] if BOOK.is_file() else " ".join(f"w{i % 90} w{(i * 7) % 90}" for i in range(9000))
    (root / "train.txt").write_text(text)
    torch.manual_seed(0)
    model = build("llama", tie_word_embeddings=True, max_position_embeddings=128)
    model.tie_weights()
    model.save_pretrained(root / "model")
    word_tokenizer(text, 96).save_pretrained(root / "model")
    return root


def _args(tiny, out, *extra):
    return ["--model", str(tiny / "model"), "--data", str(tiny / "train.txt"), "--seq-len", str(SEQ), "--lr", "3e-3",
            "--warmup", "2", "--log-every", "1", "--save-every", "4", "--loss-chunk", "40", "--out", str(out), *extra]


def _windows(tiny):
    from transformers import AutoTokenizer

    from attn_patch.evals.text import load_texts
    from attn_patch.training import token_windows

    return token_windows(AutoTokenizer.from_pretrained(tiny / "model"), load_texts(str(tiny / "train.txt")), SEQ)


def test_training_lowers_the_loss_and_saves_a_loadable_moh_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    import attn_patch

    out = tmp_path / "run"
    assert load_script(TRAIN).main(_args(tiny, out, "--steps", "30", "--active", "0.5", "--router", "norm")) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30 and log[-1]["tokens"] == 30 * SEQ
    early, late = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert late < early - 0.3, (early, late)
    assert all(0.5 < r["aux"] / 0.01 / 2 < 5 for r in log), "per-layer balance loss near 1, two layers, weight 0.01"
    assert all(r["active"] == pytest.approx(0.5) for r in log)
    info = json.loads((out / "attn_patch.json").read_text())
    assert info["method"] == "moh" and info["options"]["active"] == 0.5
    routers = json.loads((out / "routers" / "config.json").read_text())
    assert routers["router"] == {"kind": "norm", "shared": 1, "top_k": 2, "num_heads": 6, "layers": [[1, 2]] * 2,
                                 "gates": "scaled"}
    assert routers["calibration"]["tokens"] == 4 * SEQ and len(routers["calibration"]["importance"]) == 2

    tuned = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    untouched = AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    ids = _windows(tiny)[:2]
    with torch.no_grad(), attn_patch.patched(tuned, "moh", routers=str(out / "routers")):
        nll_tuned = tuned(ids, labels=ids).loss
    with torch.no_grad(), attn_patch.patched(untouched, "moh", active=0.5):
        nll_untouched = untouched(ids, labels=ids).loss
    assert nll_tuned < nll_untouched - 0.2, (nll_tuned, nll_untouched)
    assert torch.equal(tuned.get_input_embeddings().weight, tuned.get_output_embeddings().weight)


def test_resume_continues_exactly(tiny, tmp_path):
    from safetensors.torch import load_file

    recipe = load_script(TRAIN)
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    common = ("--steps", "6", "--router", "learned", "--train", "attention", "--no-save-model")
    assert recipe.main(_args(tiny, straight, *common)) == 0
    assert recipe.main(_args(tiny, sliced, *common, "--stop-at", "3")) == 0
    assert not (sliced / "routers").exists()
    assert recipe.main(_args(tiny, sliced, *common, "--resume")) == 0
    a = load_file(straight / "checkpoint" / "trainable.safetensors")
    b = load_file(sliced / "checkpoint" / "trainable.safetensors")
    assert a.keys() == b.keys() and any("moh_router.route" in k for k in a) and any("q_proj" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    r1 = load_file(straight / "routers" / "routers.safetensors")
    assert any(k.endswith("route.weight") for k in r1)


def test_dense_baseline_and_routers_only(tiny, tmp_path):
    recipe = load_script(TRAIN)
    assert recipe.main(_args(tiny, tmp_path / "dense", "--steps", "2", "--dense")) == 0
    info = json.loads((tmp_path / "dense" / "attn_patch.json").read_text())
    assert info["method"] == "flash" and not (tmp_path / "dense" / "routers").exists()
    assert recipe.main(_args(tiny, tmp_path / "r", "--steps", "2", "--router", "learned", "--train", "routers",
                             "--no-save-model")) == 0
    with pytest.raises(SystemExit, match="nothing to train"):
        recipe.main(_args(tiny, tmp_path / "x", "--steps", "1", "--train", "routers", "--router", "norm"))
    with pytest.raises(SystemExit, match="drop the MoH options"):
        recipe.main(_args(tiny, tmp_path / "y", "--steps", "1", "--dense", "--active", "0.5"))


def test_distill_loss_equals_direct_computation():
    import torch.nn.functional as F

    from attn_patch.training import chunked_distill_loss

    torch.manual_seed(0)
    head, t_head = torch.nn.Linear(16, 50), torch.nn.Linear(16, 50)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    t_hidden = torch.randn(2, 37, 16)
    labels = torch.randint(0, 50, (2, 37))
    labels[1, 3:8] = -100
    nll, kl, count = chunked_distill_loss(hidden, head, t_hidden, t_head, labels, chunk=10)
    logp = F.log_softmax(head(hidden)[:, :-1], -1).reshape(-1, 50)
    logq = F.log_softmax(t_head(t_hidden)[:, :-1], -1).reshape(-1, 50)
    keep = labels[:, 1:].reshape(-1) != -100
    want_kl = F.kl_div(logp[keep], logq[keep], log_target=True, reduction="sum")
    want_nll = F.nll_loss(logp, labels[:, 1:].reshape(-1), reduction="sum", ignore_index=-100)
    assert count == int(keep.sum()) == 2 * 36 - 5
    torch.testing.assert_close(nll, want_nll)
    torch.testing.assert_close(kl, want_kl)
    g1 = torch.autograd.grad(nll + 0.7 * kl, (hidden, head.weight))
    g2 = torch.autograd.grad(want_nll + 0.7 * want_kl, (hidden, head.weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert t_head.weight.grad is None


def test_distill_from_the_untouched_model(tiny, tmp_path):
    """--distill: the KL to the frozen pre-patch model is logged, and a large weight keeps the trained
    model much closer to it than a negligible one does; the teacher is not trained or saved."""
    kls = {}
    for weight in ("1e-9", "5.0"):
        out = tmp_path / f"kd{weight}"
        assert load_script(TRAIN).main(_args(tiny, out, "--steps", "12", "--active", "0.5", "--distill", weight,
                                              "--no-save-model", "--mixed-precision", "no")) == 0
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert log[0]["kl"] > 1e-4  # dropped heads: not the teacher even at the start
        kls[weight] = sum(r["kl"] for r in log[-4:]) / 4
        assert json.loads((out / "attn_patch.json").read_text())["distill"] == float(weight)
    assert kls["5.0"] < 0.85 * kls["1e-9"], kls  # CPU: ~0.3x; H200 (Triton kernels, TF32): ~0.75x
    from safetensors.torch import load_file

    names = load_file(out / "checkpoint" / "trainable.safetensors").keys()
    assert not any("teacher" in n for n in names) and any("q_proj" in n for n in names)


def test_two_process_data_parallel_launch(tiny, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
           str(TRAIN), *_args(tiny, out, "--steps", "3", "--router", "learned", "--allocate", "--no-save-model")]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on CPU
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((out / "attn_patch.json").read_text())
    assert info["training"]["processes"] == 2 and info["training"]["tokens"] == 3 * SEQ * 2
    meta = json.loads((out / "routers" / "config.json").read_text())  # rank 0's allocation, used by both ranks
    assert [sh + k for sh, k in meta["router"]["layers"]] == meta["calibration"]["allocation"]["heads"]


def test_allocate_sets_heads_per_layer(tiny, tmp_path):
    """--allocate: per-layer head counts from loss probes after calibration, within --active, saved with
    the routers (and loaded back by apply); --shared cannot be combined with it."""
    import attn_patch

    recipe = load_script(TRAIN)
    out = tmp_path / "alloc"
    assert recipe.main(_args(tiny, out, "--steps", "2", "--active", "0.5", "--allocate", "--router", "learned")) == 0
    meta = json.loads((out / "routers" / "config.json").read_text())
    heads = [sh + k for sh, k in meta["router"]["layers"]]
    assert meta["calibration"]["allocation"]["heads"] == heads and sum(heads) <= 6 and len(heads) == 2
    assert json.loads((out / "attn_patch.json").read_text())["allocate"] is True
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    with attn_patch.patched(tuned, "moh", routers=str(out / "routers")):
        assert attn_patch.stats(tuned)["heads_per_layer"] == heads
    with pytest.raises(SystemExit, match="drop --shared"):
        recipe.main(_args(tiny, tmp_path / "x", "--steps", "1", "--allocate", "--shared", "1"))
    sliced = tmp_path / "sliced"  # a resumed run takes its counts from the checkpoint's routers
    common = ("--steps", "4", "--active", "0.5", "--allocate", "--no-save-model")
    assert recipe.main(_args(tiny, sliced, *common, "--stop-at", "2")) == 0
    assert recipe.main(_args(tiny, sliced, *common, "--resume")) == 0
    want = json.loads((sliced / "checkpoint" / "routers" / "config.json").read_text())["router"]["layers"]
    assert json.loads((sliced / "routers" / "config.json").read_text())["router"]["layers"] == want


def test_predict_router_is_calibrated_then_trained(tiny, tmp_path):
    """--router predict: calibration on the first --calibrate-windows windows fits the routers (no
    shared heads, fit_r2 saved), training then moves their weights at --lr (not 10x) and lowers the
    loss; the saved model + routers load back fitted and beat the untouched model with freshly fitted
    routers; --calibrate-windows 0 is refused."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import attn_patch
    from attn_patch.moh import calibrate, routers_of

    recipe = load_script(TRAIN)
    out = tmp_path / "predict"
    assert recipe.main(_args(tiny, out, "--steps", "30", "--active", "0.5", "--router", "predict")) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30 and all(r["active"] == pytest.approx(0.5) for r in log)
    early, late = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert late < early - 0.3, (early, late)
    info = json.loads((out / "attn_patch.json").read_text())
    assert info["options"]["router"] == "predict" and "routers" not in info["options"]
    assert info["training"]["router_lr"] == pytest.approx(3e-3)
    meta = json.loads((out / "routers" / "config.json").read_text())
    assert meta["router"]["kind"] == "predict" and meta["router"]["layers"] == [[0, 3]] * 2
    assert meta["calibration"]["tokens"] == 4 * SEQ and len(meta["calibration"]["fit_r2"]) == 2
    trained = load_file(out / "routers" / "routers.safetensors")

    untouched = AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    windows = _windows(tiny)
    with attn_patch.patched(untouched, "moh", router="predict", active=0.5):
        cal = calibrate(untouched, [windows[i:i + 1] for i in range(4)])  # what the run started from
        assert cal["fit_r2"] == pytest.approx(meta["calibration"]["fit_r2"], abs=1e-3)
        assert all(0.0 < v <= 1.0 for v in cal["fit_r2"])
        for i, r in enumerate(routers_of(untouched)):
            assert trained[f"layers.{i}.route.weight"].shape == r.route.weight.shape
            moved = (trained[f"layers.{i}.route.weight"] - r.route.weight.detach()).abs().max()
            assert moved > 1e-3, f"layer {i}: the router did not train ({float(moved)})"
            assert torch.equal(trained[f"layers.{i}.head_order"], r.head_order)
        ids = windows[:2]
        with torch.no_grad():
            nll_untouched = untouched(ids, labels=ids).loss
    tuned = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    with torch.no_grad(), attn_patch.patched(tuned, "moh", routers=str(out / "routers")):
        assert all(r.kind == "predict" and r.fitted for r in routers_of(tuned))
        nll_tuned = tuned(ids, labels=ids).loss
    assert nll_tuned < nll_untouched - 0.2, (nll_tuned, nll_untouched)
    with pytest.raises(SystemExit, match="calibrate-windows"):
        recipe.main(_args(tiny, tmp_path / "x", "--steps", "1", "--router", "predict", "--calibrate-windows", "0"))


def test_predict_router_resume_and_allocate(tiny, tmp_path):
    """--router predict resumes exactly (the fitted routers come back from the checkpoint); with
    --allocate every kept head of a layer is routed (per-layer splits [0, a], or [6, 0] for a whole
    layer) within --active, and apply loads the counts back."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import attn_patch

    recipe = load_script(TRAIN)
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    common = ("--steps", "6", "--router", "predict", "--train", "attention", "--no-save-model")
    assert recipe.main(_args(tiny, straight, *common)) == 0
    assert recipe.main(_args(tiny, sliced, *common, "--stop-at", "3")) == 0
    assert recipe.main(_args(tiny, sliced, *common, "--resume")) == 0
    a = load_file(straight / "checkpoint" / "trainable.safetensors")
    b = load_file(sliced / "checkpoint" / "trainable.safetensors")
    assert a.keys() == b.keys() and any("moh_router.route.weight" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert json.loads((straight / "routers" / "config.json").read_text())["router"]["layers"] == [[0, 5]] * 2

    out = tmp_path / "alloc"
    assert recipe.main(_args(tiny, out, "--steps", "2", "--active", "0.5", "--allocate", "--router", "predict")) == 0
    meta = json.loads((out / "routers" / "config.json").read_text())
    layers = meta["router"]["layers"]
    assert meta["router"]["kind"] == "predict" and len(layers) == 2
    assert all(sh == 0 and 1 <= k < 6 or (sh, k) == (6, 0) for sh, k in layers), layers
    heads = [sh + k for sh, k in layers]
    allocation = meta["calibration"]["allocation"]
    assert allocation["heads"] == heads and allocation["top_k"] is None and sum(heads) <= 6
    assert allocation["levels"] == list(range(1, 7)) and len(meta["calibration"]["fit_r2"]) == 2
    tuned = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    with attn_patch.patched(tuned, "moh", routers=str(out / "routers")):
        assert attn_patch.stats(tuned)["heads_per_layer"] == heads
