"""recipes/longlora_train.py and longlora_merge.py on a tiny model on CPU: the loss falls, the merged
model reproduces the adapted model's logits and keeps the RoPE scaling, resume is exact, DDP runs."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build, load_script, word_tokenizer

from attn_patch.training import chunked_lm_loss, document_positions

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "recipes" / "longlora_train.py"
MERGE = ROOT / "recipes" / "longlora_merge.py"
BOOK = ROOT.parent / "shared" / "data" / "books" / "moby_dick.txt"
SEQ = 96


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with tied embeddings and a word-level tokenizer, saved as a model folder."""
    root = tmp_path_factory.mktemp("longlora")
    text = BOOK.read_text()[:60_000] if BOOK.is_file() else " ".join(f"w{i % 90} w{(i * 7) % 90}" for i in range(9000))
    (root / "train.txt").write_text(text)
    torch.manual_seed(0)
    model = build("llama", tie_word_embeddings=True, max_position_embeddings=64)
    model.tie_weights()
    model.save_pretrained(root / "model")
    word_tokenizer(text, 96).save_pretrained(root / "model")
    return root


def _args(tiny, out, *extra, group=True):
    return ["--model", str(tiny / "model"), "--data", str(tiny / "train.txt"), "--seq-len", str(SEQ),
            "--rope-scaling", "linear:2", *(["--attention-opt", "group=0.25"] if group else []), "--lr", "5e-3",
            "--warmup", "2", "--log-every", "1", "--save-every", "4", "--loss-chunk", "40", "--out", str(out), *extra]


def _windows(tiny):
    from transformers import AutoTokenizer

    from attn_patch.evals.text import load_texts
    from attn_patch.training import token_windows

    return token_windows(AutoTokenizer.from_pretrained(tiny / "model"), load_texts(str(tiny / "train.txt")), SEQ)


def test_training_lowers_the_loss_and_the_merge_reproduces_the_adapted_model(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import attn_patch
    from attn_patch.models import with_rope_scaling

    out = tmp_path / "run"
    assert load_script(TRAIN).main(_args(tiny, out, "--steps", "40", "--merge")) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and log[-1]["step"] == 40 and log[-1]["tokens"] == 40 * SEQ
    early = sum(r["loss"] for r in log[:5]) / 5
    late = sum(r["loss"] for r in log[-5:]) / 5
    assert late < early - 0.3, (early, late)
    info = json.loads((out / "attn_patch.json").read_text())
    assert info["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and info["attention"] == "longlora"

    # the adapted model: base with the same RoPE scaling + the adapter (eval: dense attention)
    from transformers import AutoConfig

    config = with_rope_scaling(AutoConfig.from_pretrained(tiny / "model"), info["rope_scaling"])
    base = AutoModelForCausalLM.from_pretrained(tiny / "model", config=config)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert merged.config.rope_parameters["rope_type"] == "linear" and merged.config.rope_parameters["factor"] == 2.0
    assert merged.config.max_position_embeddings == 128
    ids = _windows(tiny)[:2]
    with torch.no_grad():
        want = adapted(ids).logits
        got = merged(ids).logits
        untouched = AutoModelForCausalLM.from_pretrained(tiny / "model", config=config)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - untouched).abs().max() > 1e-2  # the training changed the model
    # the trained embedding is the output embedding too (tied before, tied after)
    assert torch.equal(merged.get_input_embeddings().weight, merged.get_output_embeddings().weight)
    # the adapted model under S2-Attn in train mode runs on the merged weights as well
    with attn_patch.patched(merged, "longlora", group=0.25):
        merged.train()
        with torch.no_grad():
            s2 = merged(ids).logits
    assert torch.isfinite(s2).all()


def test_resume_continues_exactly(tiny, tmp_path):
    from safetensors.torch import load_file

    recipe = load_script(TRAIN)
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    assert recipe.main(_args(tiny, straight, "--steps", "6")) == 0
    assert recipe.main(_args(tiny, sliced, "--steps", "6", "--stop-at", "3")) == 0
    assert not (sliced / "adapter").exists() and (sliced / "checkpoint" / "trainer_state.pt").is_file()
    assert recipe.main(_args(tiny, sliced, "--steps", "6", "--resume")) == 0
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(sliced / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_A" in k for k in a) and any("embed_tokens" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_retrieval_mix_trains_on_the_answers(tiny, tmp_path):
    """--retrieval-mix: the answer loss is logged per step (a mean over answer tokens) and falls."""
    out = tmp_path / "mix"
    assert load_script(TRAIN).main(_args(tiny, out, "--steps", "12", "--retrieval-mix", "1",
                                         "--retrieval-facts", "1", "--retrieval-weight", "2")) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["answer_loss"]) and "answer_loss_count" not in r for r in log)
    assert sum(r["answer_loss"] for r in log[-3:]) < sum(r["answer_loss"] for r in log[:3]) - 0.5
    info = json.loads((out / "attn_patch.json").read_text())
    assert info["retrieval_mix"] == {"share": 1.0, "facts": 1, "weight": 2.0}
    recipe = load_script(TRAIN)
    with pytest.raises(SystemExit, match="--doc-mask"):
        recipe.main(_args(tiny, tmp_path / "x", "--steps", "1", "--retrieval-mix", "0.5", "--doc-mask"))
    with pytest.raises(SystemExit, match="--retrieval-mix"):
        recipe.main(_args(tiny, tmp_path / "y", "--steps", "1", "--retrieval-mix", "-0.5"))
    with pytest.raises(SystemExit, match="longer --seq-len"):
        recipe.main(_args(tiny, tmp_path / "z", "--steps", "1", "--retrieval-mix", "0.5", "--retrieval-facts", "9"))


def test_dense_and_packed_attention_options(tiny, tmp_path):
    """--attention flash (the dense baseline) and --doc-mask train too; bad options are refused."""
    recipe = load_script(TRAIN)
    assert recipe.main(_args(tiny, tmp_path / "flash", "--steps", "2", "--attention", "flash", group=False)) == 0
    assert recipe.main(_args(tiny, tmp_path / "doc", "--steps", "2", "--doc-mask", "--attention-opt", "sink=2")) == 0
    # LoRA under seer's block-sparse attention (frozen gates; here untrained ones at half density)
    seer = ["--attention", "seer", *(f"--attention-opt={o}" for o in ("gates=untrained", "density=0.5",
                                                                         "block_size=16", "min_length=0",
                                                                         "dense_last=0"))]
    assert recipe.main(_args(tiny, tmp_path / "seer", "--steps", "2", *seer, group=False)) == 0
    info = json.loads((tmp_path / "seer" / "attn_patch.json").read_text())
    assert info["attention"] == "seer" and math.isfinite(info["training"]["final_loss"])
    with pytest.raises(Exception, match="unknown option"):
        recipe.main(_args(tiny, tmp_path / "bad", "--steps", "1", "--attention-opt", "groups=3"))
    with pytest.raises(SystemExit, match="held out"):
        held = tmp_path / "news_from_nowhere.txt"
        held.write_text((tiny / "train.txt").read_text())
        recipe.main(["--data", str(held), "--out", str(tmp_path / "x")])


def test_chunked_loss_equals_full_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37))
    labels[0, 5:9] = -100
    total, count = chunked_lm_loss(hidden, head, labels, chunk=10)
    logits = head(hidden)[:, :-1]
    want = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum", ignore_index=-100)
    assert count == 2 * 36 - 4
    torch.testing.assert_close(total, want)
    g1 = torch.autograd.grad(total, (hidden, head.weight))
    g2 = torch.autograd.grad(want, (hidden, head.weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_document_positions_restart_after_eos():
    ids = torch.tensor([[5, 6, 1, 7, 8, 9, 1, 4], [1, 2, 3, 4, 5, 1, 1, 2]])
    want = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 0, 0]])
    assert torch.equal(document_positions(ids, 1), want)


def test_two_process_data_parallel_launch(tiny, tmp_path):
    """Two processes under torchrun (what `accelerate launch` with the DDP config starts; on CPU over
    gloo): the adapters stay identical across ranks and the run records both processes."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
           str(TRAIN), *_args(tiny, out, "--steps", "3")]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on CPU
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((out / "attn_patch.json").read_text())
    assert info["training"]["processes"] == 2 and info["training"]["tokens"] == 3 * SEQ * 2


def test_sdpa_backend_stays_pinned_in_the_recomputed_backward(tiny, tmp_path, monkeypatch):
    """--sdpa-backend math with gradient checkpointing: every SDPA call, the forward's and the ones
    backward makes when it recomputes the layers, runs with only the math backend enabled (the pin
    used to end with the forward: an H200 run with the flash backend died in a CheckpointError)."""
    real = F.scaled_dot_product_attention
    calls = []

    def recording(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                      torch.backends.cuda.math_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    out = tmp_path / "run"
    assert load_script(TRAIN).main(_args(tiny, out, "--steps", "2", "--attention", "sdpa", "--sdpa-backend", "math",
                                         group=False)) == 0
    layers = 2
    assert len(calls) >= 2 * 2 * layers  # per step: the forward and the recompute of each layer
    assert all(flags == (True, False, True) for flags in calls), calls
    assert torch.backends.cuda.flash_sdp_enabled()  # released after the loop
