"""Shared evaluation plumbing: method specs, RoPE scaling for long contexts, text sources, progress
in a log, device and dtype checks before a model loads."""
import io

import pytest
import torch

import attn_patch
from attn_patch.errors import ConfigError
from attn_patch.evals.common import load_model, max_context, parse_method, parse_methods, progress
from attn_patch.evals.text import generated_filler, load_texts
from attn_patch.models import (check_device, check_dtype, load_default_model, parse_rope_scaling, quiet_loading_bars,
                               with_rope_scaling)
from tiny_models import build


def test_method_specs():
    assert parse_method("sdpa").method is None
    assert parse_method("sdpa-cudnn").sdpa_backend == "CUDNN_ATTENTION"
    spec = parse_method("flash:backend=reference,decode_splits=4")
    assert spec.method == "flash" and spec.options == {"backend": "reference", "decode_splits": 4}
    with pytest.raises(ConfigError, match="available methods"):
        parse_method("nope")
    with pytest.raises(ConfigError, match="decode"):
        parse_method("flash:decode=sometimes")
    with pytest.raises(ConfigError, match="name=value"):
        parse_method("flash:backend")
    with pytest.raises(ConfigError, match="takes no options"):
        parse_method("sdpa:x=1")
    with pytest.raises(ConfigError, match="twice"):
        parse_methods(["flash", "flash"])


def test_method_context_patches_and_restores():
    model = build("llama")
    ids = torch.randint(1, 90, (1, 12))
    with torch.no_grad():
        base = model(ids).logits
        with parse_method("flash:backend=reference").context(model):
            assert attn_patch.patch_state(model).method == "flash"
            patched = model(ids).logits
        with parse_method("sdpa-math").context(model):
            pinned = model(ids).logits
    assert attn_patch.patch_state(model) is None and model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(patched, base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pinned, base, atol=1e-5, rtol=1e-5)


def test_rope_scaling_is_merged_and_changes_the_rotary_embedding():
    assert parse_rope_scaling("linear:4") == {"rope_type": "linear", "factor": 4.0}
    assert parse_rope_scaling('{"rope_type": "yarn", "factor": 2}')["rope_type"] == "yarn"
    for bad in ("linear", "cubic:2", "linear:0.5", "yarn:x"):
        with pytest.raises(ValueError, match="TYPE:FACTOR"):
            parse_rope_scaling(bad)
    model = build("llama")
    theta = model.config.rope_parameters["rope_theta"]
    cfg = with_rope_scaling(model.config.__class__(**model.config.to_dict()), parse_rope_scaling("linear:4"))
    assert cfg.rope_parameters["rope_theta"] == theta and cfg.rope_parameters["factor"] == 4.0
    assert cfg.max_position_embeddings == 4 * model.config.max_position_embeddings
    scaled = model.__class__(cfg).eval()
    base_freq = model.model.rotary_emb.inv_freq
    torch.testing.assert_close(scaled.model.rotary_emb.inv_freq, base_freq / 4)  # positions interpolated x4


def _cos(model, n):
    x = torch.zeros(1, n, model.config.hidden_size)
    return model.model.rotary_emb(x, torch.arange(n)[None])[0][0]


def test_dynamic_ntk_rescales_beyond_the_trained_length_and_not_before():
    # transformers' dynamic NTK takes max_position_embeddings as the trained length: growing it by the
    # factor (as for the static types) would leave dynamic scaling off up to factor x that length
    model = build("llama")
    trained = model.config.max_position_embeddings
    cfg = with_rope_scaling(model.config.__class__(**model.config.to_dict()), parse_rope_scaling("dynamic:4"))
    assert cfg.max_position_embeddings == trained and set(cfg.rope_parameters) == {"rope_type", "rope_theta", "factor"}
    dyn = model.__class__(cfg).eval()
    torch.testing.assert_close(_cos(dyn, trained), _cos(model, trained))
    beyond = _cos(dyn, 2 * trained)
    assert (beyond - _cos(model, 2 * trained)).abs().max() > 1e-2
    half = trained // 2  # back to the original frequencies for a shorter sequence
    torch.testing.assert_close(_cos(dyn, half), _cos(model, half))
    assert max_context(dyn) == 4 * trained and max_context(model) == trained  # the evals' length check


def test_base_frequency_scalings_are_plain_rope_with_a_larger_theta():
    model = build("llama")
    theta, trained = model.config.rope_parameters["rope_theta"], model.config.max_position_embeddings
    dim = model.config.hidden_size // model.config.num_attention_heads
    assert parse_rope_scaling("theta:1e6:4") == {"rope_type": "theta", "rope_theta": 1e6, "factor": 4.0}
    assert parse_rope_scaling("theta:5e5")["factor"] == 1.0
    assert parse_rope_scaling('{"rope_type": "theta", "rope_theta": 2e5}')["factor"] == 1.0
    assert parse_rope_scaling("llama3:4")["high_freq_factor"] == 4.0
    for bad in ("theta", "theta:x", "theta:-1:4", "theta:1e6:0.5", "ntk:x", '{"rope_type": "theta", "factor": 2}',
                "linear:nan", "yarn:inf", "theta:1e6:nan", '{"rope_type": "theta", "rope_theta": true}',
                {"rope_type": "theta", "factor": 4}, {"rope_type": "cubic", "factor": 2}):
        with pytest.raises(ValueError, match="TYPE:FACTOR"):
            parse_rope_scaling(bad)
    for text, expect in (("ntk:4", theta * 4 ** (dim / (dim - 2))), ("theta:1e6:4", 1e6)):
        cfg = with_rope_scaling(model.config.__class__(**model.config.to_dict()), parse_rope_scaling(text))
        assert cfg.rope_parameters["rope_type"] == "default" and "factor" not in cfg.rope_parameters
        assert cfg.rope_parameters["rope_theta"] == pytest.approx(expect)
        assert cfg.max_position_embeddings == 4 * trained
        scaled = model.__class__(cfg).eval()
        want = 1.0 / expect ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
        torch.testing.assert_close(scaled.model.rotary_emb.inv_freq, want)
        # the saved config is plain transformers: it reloads to the same rotary embedding
        again = model.__class__(model.config.__class__(**cfg.to_dict())).eval()
        torch.testing.assert_close(again.model.rotary_emb.inv_freq, want)


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("gamma")
    (tmp_path / "c.bin").write_text("not text")
    assert [d.text for d in load_texts(str(tmp_path))] == ["alpha beta", "gamma"]
    assert [d.text for d in load_texts(str(tmp_path / "*.txt"))] == ["alpha beta"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no text files"):
        load_texts(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no text given"):
        load_texts([])
    filler = generated_filler(50, seed=3)
    assert filler == generated_filler(50, seed=3) and filler != generated_filler(50, seed=4)
    assert not any(c.isdigit() for c in filler)


# ---------------------------------------------------------------- progress off a terminal


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_off_a_terminal_writes_each_line_once():
    """Into a log (a stream that is no terminal) progress is plain lines, never a redrawn bar: at most
    one line per twentieth of the run plus the last, each written once, with the step's note."""
    for total, expect in ((100, 20), (7, 7), (45, 23)):
        log = io.StringIO()
        bar = progress(total=total, desc="passkey", file=log)
        for step in range(total):
            bar.set_postfix_str(f"step {step + 1}")
            bar.update(1)
        bar.close()
        lines = log.getvalue().splitlines()
        assert "\r" not in log.getvalue() and len(lines) == expect and len(set(lines)) == len(lines)
        assert lines[-1].startswith(f"passkey {total}/{total} (100%)") and lines[-1].endswith(f": step {total}")
    quiet = io.StringIO()
    progress(total=5, file=quiet, disable=True).update(5)
    assert quiet.getvalue() == ""


def test_progress_on_a_terminal_is_a_bar():
    tqdm = pytest.importorskip("tqdm")
    bar = progress(total=3, desc="x", file=_Terminal())
    assert isinstance(bar, tqdm.tqdm)
    bar.close()


def test_loading_bars_are_quiet_in_a_log(capsys):
    """transformers' weight-loading and GGUF-conversion bars write nothing while stderr is no terminal
    (pytest's capture is none), and are back afterwards."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar = gguf_utils.tqdm
    with quiet_loading_bars():
        list(hf_logging.tqdm(range(3), desc="Loading weights"))
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert capsys.readouterr().err == ""
    assert gguf_utils.tqdm is bar and hf_logging.is_progress_bar_enabled()


# ---------------------------------------------------------------- devices and dtypes


def _no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the device / dtype was checked")


@pytest.mark.parametrize("device, setup, message", [
    ("cuda", {"version.cuda": None, "version.hip": None}, r"built without CUDA; use device='cpu'.*CUDA build of torch"),
    ("cuda", {"version.cuda": "12.8", "cuda.is_available": lambda: False},
     r"no CUDA GPU is visible .*; use device='cpu'"),
    ("cuda:3", {"version.cuda": "12.8", "cuda.is_available": lambda: True, "cuda.device_count": lambda: 2},
     r"has 2 CUDA GPU\(s\) visible; use one of cuda:0 \.\. cuda:1"),
    ("mps", {"backends.mps.is_available": lambda: False}, r"MPS .* not available here; use device='cpu'"),
    ("gpu", {}, r"'gpu' is not a device name: use 'cpu', 'cuda' or 'cuda:N'"),
])
def test_load_default_model_checks_the_device_first(device, setup, message, monkeypatch):
    for name, value in setup.items():
        monkeypatch.setattr(f"torch.{name}", value)
    monkeypatch.setattr("attn_patch.models.default_gguf_path", _no_loading)
    with pytest.raises(ConfigError, match=message):
        load_default_model(device=device)
    with pytest.raises(ConfigError, match=message):
        load_model(None, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_readme_example_on_a_cpu_machine(monkeypatch):
    """The README's load_default_model(dtype=torch.bfloat16, device="cuda") on this CPU-only torch."""
    monkeypatch.setattr("attn_patch.models.default_gguf_path", _no_loading)
    with pytest.raises(ConfigError, match=r"device 'cuda': this torch .* is built without CUDA; use device='cpu'"):
        load_default_model(dtype=torch.bfloat16, device="cuda")


def test_devices_and_dtypes_that_work_pass():
    assert check_device("cpu") == torch.device("cpu") and check_device(torch.device("cpu")) == torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert check_dtype(dtype) is dtype and check_dtype(str(dtype)) is dtype
    assert check_dtype("bfloat16") is torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.float8_e4m3fn, "auto", "half8", None])
def test_load_default_model_refuses_a_dtype_weights_cannot_take(dtype, monkeypatch):
    monkeypatch.setattr("attn_patch.models.default_gguf_path", _no_loading)
    with pytest.raises(ConfigError, match="load the model in torch.float32, torch.bfloat16, torch.float16 or"):
        load_default_model(dtype=dtype)
