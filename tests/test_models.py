"""Patched tiny models of every supported family behave exactly like the unpatched model (fp32).

Each test runs twice: through the PyTorch reference (what CPU users get) and through the Triton
kernels (interpreted on CPU, compiled on GPU) in float32 with exact dots.
"""
import pytest
import torch
from conftest import DEVICE, has_triton
from tiny_models import FAMILIES, build, left_padded_batch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

import attn_patch

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not has_triton(), reason="no triton"))]


def _real(mask):
    return mask.bool()


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _model(family, seed):
    torch.manual_seed(seed)
    return build(family).to(DEVICE)


def test_logits_match(family, backend, seed):
    model = _model(family, seed)
    ids, mask = left_padded_batch([13, 9, 4], 13)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        unpadded = model(ids[:1]).logits
        with attn_patch.patched(model, "flash", backend=backend):
            got = model(ids, attention_mask=mask).logits
            got_unpadded = model(ids[:1]).logits
    real = _real(mask)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=2e-5, msg=f"seed {seed}")
    torch.testing.assert_close(got_unpadded, unpadded, rtol=1e-5, atol=2e-5, msg=f"seed {seed}")


def test_loss_gradients_match(family, backend, seed):
    model = _model(family, seed)
    ids, mask = left_padded_batch([11, 7], 11)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    labels = ids.masked_fill(mask == 0, -100)

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads()
    with attn_patch.patched(model, "flash", backend=backend):
        got = grads()
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=f"{name} (seed {seed})")


def test_greedy_generate_left_padded(family, backend, seed):
    model = _model(family, seed)
    ids, mask = left_padded_batch([10, 6, 3], 10)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    with attn_patch.patched(model, "flash", backend=backend):
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, expected), f"seed {seed}"


def test_cached_decoding_equals_full_forward(family, backend, seed):
    """A 5-token prefill, a 3-token chunk on top of the cache, then one token at a time."""
    model = _model(family, seed)
    ids, mask = left_padded_batch([14, 10], 14)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    pos = _positions(mask)
    attn_patch.apply(model, "flash", backend=backend)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache = DynamicCache(config=model.config)
        steps = [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 14)]
        pieces = []
        for start, end in steps:
            out = model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end],
                        past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
    attn_patch.remove(model)
    stepped = torch.cat(pieces, dim=1)
    real = _real(mask)
    torch.testing.assert_close(stepped[real], full[real], rtol=1e-4, atol=1e-4, msg=f"seed {seed}")


def test_remove_restores_exactly(family, seed):
    model = _model(family, seed)
    ids, mask = left_padded_batch([8, 5], 8)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    before_impl = model.config._attn_implementation
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_config = model.config.to_dict()
    config_object = model.config
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        attn_patch.apply(model, "flash")
        name = model.config._attn_implementation
        assert name != before_impl and name in AttentionInterface._global_mapping
        assert name in AttentionMaskInterface._global_mapping
        assert "flash" not in name  # transformers would treat it as FlashAttention
        attn_patch.remove(model)
        after = model(ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert model.config._attn_implementation == before_impl
    assert model.config.to_dict() == before_config
    # the model has its own config object back; "attn_patch" stays registered (once per process, read
    # only by models whose modules carry a patch)
    assert model.config is config_object
    assert attn_patch.patch_state(model) is None
    after_state = model.state_dict()
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)


@pytest.mark.parametrize("family,overrides", [
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=5, layer_types=["sliding_attention", "full_attention"])),
])
def test_family_variants(family, overrides, backend, seed):
    """GPT-2's layer-scaled softmax and Qwen2's per-layer sliding windows, with a left-padded batch."""
    torch.manual_seed(seed)
    model = build(family, **overrides).to(DEVICE)
    ids, mask = left_padded_batch([12, 7], 12)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        expected_tokens = model.generate(ids, **kwargs)
        with attn_patch.patched(model, "flash", backend=backend):
            got = model(ids, attention_mask=mask).logits
            got_tokens = model.generate(ids, **kwargs)
    real = _real(mask)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=2e-5, msg=f"seed {seed}")
    assert torch.equal(got_tokens, expected_tokens)
