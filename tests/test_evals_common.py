"""Shared evaluation plumbing: method specs, RoPE scaling for long contexts, text sources."""
import pytest
import torch

from attn_patch.errors import ConfigError
from attn_patch.evals.common import parse_method, parse_methods
from attn_patch.evals.text import generated_filler, load_texts
from attn_patch.models import parse_rope_scaling, with_rope_scaling
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
            assert model.config._attn_implementation.startswith("attn_patch_")
            patched = model(ids).logits
        with parse_method("sdpa-math").context(model):
            pinned = model(ids).logits
    assert model.config._attn_implementation == "sdpa"
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
    dyn = with_rope_scaling(model.config.__class__(**model.config.to_dict()), parse_rope_scaling("dynamic:2"))
    assert dyn.rope_parameters["original_max_position_embeddings"] == model.config.max_position_embeddings


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
