"""The mask function: recognised patterns stay compact, anything else is materialised, never wrong."""
import pytest
import torch
from conftest import DEVICE
from tiny_models import build, left_padded_batch
from transformers import StaticCache
from transformers import masking_utils as mu

import attn_patch
from attn_patch.masks import AttentionMask, mask_function, packed_documents, recognise


def test_recognises_model_patterns():
    assert recognise(mu.causal_mask_function) == (True, None)
    assert recognise(mu.bidirectional_mask_function) == (False, None)
    assert recognise(mu.sliding_window_causal_mask_function(37)) == (True, 37)
    packed = mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(torch.zeros(1, 4)))
    assert recognise(packed) is None


def test_packed_sequences_are_kept_as_document_ids():
    """Both forms transformers has used for packed sequences give the document ids; the causal
    mask and-ed with anything else does not."""
    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    old = mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(docs))
    assert packed_documents(old) is docs
    if hasattr(mu, "packed_sequence_compatibility_function"):
        pos = torch.tensor([[0, 1, 0, 1, 2, 0]])
        new = mu.packed_sequence_compatibility_function(mu.causal_mask_function, pos, docs)
        assert packed_documents(new) is docs
    assert packed_documents(mu.and_masks(mu.causal_mask_function, mu.sliding_window_overlay(3))) is None
    m = mask_function(1, 6, 6, mask_function=old)
    assert m.dense is None and torch.equal(m.documents, docs)
    dense = m.kernel_args()["dense_mask"]
    assert dense.shape == (1, 1, 6, 6) and bool(dense[0, 0, 3, 2]) and not bool(dense[0, 0, 3, 1])


def test_compact_mask_carries_offsets_and_padding():
    pad = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    m = mask_function(1, 2, 6, q_offset=4, kv_offset=0, attention_mask=pad)
    assert isinstance(m, AttentionMask) and m.causal and m.q_offset == 4 and m.dense is None
    assert torch.equal(m.key_padding, pad)
    full = mask_function(1, 2, 6, q_offset=4, attention_mask=torch.ones(1, 6, dtype=torch.bool))
    assert full.key_padding is None  # an all-ones mask costs the kernel nothing


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_packed_sequences_use_a_dense_mask(backend, seed):
    """position_ids restarting mid-row (packed documents) must not leak across documents."""
    torch.manual_seed(seed)
    model = build("llama").to(DEVICE)
    ids = torch.randint(1, 90, (1, 12), device=DEVICE)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]], device=DEVICE)
    with torch.no_grad():
        # transformers detects packing only without a cache
        expected = model(ids, position_ids=pos, use_cache=False).logits
        with attn_patch.patched(model, "flash", backend=backend if _interp_or_cuda() else "reference"):
            got = model(ids, position_ids=pos, use_cache=False).logits
        separate = model(ids[:, 5:8], position_ids=pos[:, 5:8], use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got[:, 5:8], separate, rtol=1e-5, atol=2e-5)


def test_static_cache_generation_matches(seed):
    torch.manual_seed(seed)
    model = build("llama").to(DEVICE)
    ids, mask = left_padded_batch([9, 5], 9)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, past_key_values=StaticCache(config=model.config, max_cache_len=24), **kwargs)
    with attn_patch.patched(model, "flash"):
        got = model.generate(ids, past_key_values=StaticCache(config=model.config, max_cache_len=24), **kwargs)
    assert torch.equal(got, expected)


def test_prepared_4d_masks():
    model = build("llama").to(DEVICE)
    ids = torch.randint(1, 90, (1, 6), device=DEVICE)
    keep = torch.ones(6, 6, dtype=torch.bool, device=DEVICE).tril()
    keep[4, 1] = False
    bool_mask = keep[None, None]
    float_mask = torch.zeros(1, 1, 6, 6, device=DEVICE).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = model(ids, attention_mask=bool_mask).logits
        with attn_patch.patched(model, "flash"):
            got_bool = model(ids, attention_mask=bool_mask).logits
            got_float = model(ids, attention_mask=float_mask).logits
            with pytest.raises(attn_patch.UnsupportedModelError, match="bias values"):
                model(ids, attention_mask=float_mask * 0.5 + 0.25)
    torch.testing.assert_close(got_bool, expected, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got_float, expected, rtol=1e-5, atol=2e-5)


def _interp_or_cuda():
    import os

    return DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_prepared_4d_masks_both_conventions_match_sdpa(backend, seed):
    """A left-padded batch given as a prepared 4-D mask in both of SDPA's conventions (bool: True =
    attend; float: additive, 0 = attend, -inf = blocked) gives the SDPA model's logits, and the
    attention function receives the same bool mask from both."""
    from attn_patch.masks import as_attention_mask

    if backend == "triton" and not _interp_or_cuda():
        pytest.skip("the kernels need CUDA or the Triton interpreter")
    torch.manual_seed(seed)
    model = build("llama").to(DEVICE)
    ids, pad = left_padded_batch([7, 4], 7)
    ids, pad = ids.to(DEVICE), pad.to(DEVICE).bool()
    keep = torch.ones(7, 7, dtype=torch.bool, device=DEVICE).tril()[None, None] & pad[:, None, None, :]
    keep |= torch.eye(7, dtype=torch.bool, device=DEVICE)  # padded rows see themselves (no empty row)
    additive = torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
    q = torch.zeros(2, 6, 7, 16, device=DEVICE)
    for mask in (keep, additive):
        got = as_attention_mask(mask, model.model.layers[0].self_attn, q, q[:, :2])
        assert got.dense.dtype == torch.bool and torch.equal(got.dense, keep) and not got.causal
    with torch.no_grad():
        expected = model(ids, attention_mask=keep).logits
        torch.testing.assert_close(model(ids, attention_mask=additive).logits, expected, rtol=1e-5, atol=2e-5)
        with attn_patch.patched(model, "flash", backend=backend):
            got_bool = model(ids, attention_mask=keep).logits
            got_additive = model(ids, attention_mask=additive).logits
            with pytest.raises(attn_patch.UnsupportedModelError, match="bool mask"):
                model(ids, attention_mask=keep.long())  # 1/0 integers: neither of SDPA's conventions
    torch.testing.assert_close(got_bool, expected, rtol=1e-5, atol=2e-5, msg=f"seed {seed}")
    torch.testing.assert_close(got_additive, expected, rtol=1e-5, atol=2e-5, msg=f"seed {seed}")
