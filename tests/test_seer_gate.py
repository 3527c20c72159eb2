"""SeerAttention gate, ground truth and block selection (plain PyTorch parts)."""
import pytest
import torch

from attn_patch.seer import (SeerGate, achieved_density, block_causal_mask, ground_truth_reference, pool_blocks,
                             select_blocks, topk_for_density)


def _qk(b=2, hq=6, hkv=2, t=70, d=16, tk=None):
    return torch.randn(b, hq, t, d), torch.randn(b, hkv, tk or t, d)


def test_pooling_with_a_partial_last_block(seed):
    x = torch.randn(2, 3, 37, 8)
    for how, fn in (("avg", lambda c: c.mean(2)), ("max", lambda c: c.amax(2)), ("min", lambda c: c.amin(2))):
        got = pool_blocks(x, 16, how)
        want = torch.stack([fn(x[:, :, s:s + 16]) for s in range(0, 37, 16)], dim=2)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("q_proj,k_proj_per,selection", [(False, "head", "head"), (True, "group", "head"),
                                                         (False, "head", "group"), (True, "head", "group")])
def test_gate_shapes_rows_and_causality(seed, q_proj, k_proj_per, selection):
    gate = SeerGate(6, 2, 16, block_size=16, q_proj=q_proj, gate_dim=24 if q_proj else None,
                    k_proj_per=k_proj_per, selection=selection)
    q, k = _qk()
    probs = gate(q, k)
    heads = 6 if selection == "head" else 2
    assert probs.shape == (2, heads, 5, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, heads, 5))
    assert (probs[..., ~block_causal_mask(5, 5)] == 0).all()
    # a later key block never changes an earlier query block's scores
    k2 = k.clone()
    k2[:, :, 48:] += 3 * torch.randn_like(k2[:, :, 48:])
    torch.testing.assert_close(gate.logits(q, k2)[:, :, :3], gate.logits(q, k)[:, :, :3])
    loss = probs.square().sum()
    loss.backward()
    assert gate.k_weight.grad is not None and gate.k_weight.grad.abs().sum() > 0


def test_gate_chunk_after_cache_equals_rows_of_the_full_pass(seed):
    """Chunked prefill: a chunk of queries starting at a block boundary scores like those rows of a
    single pass over everything (block RoPE at absolute positions); a chunk starting inside a block
    has a partial first query block that pools only the chunk's rows."""
    gate = SeerGate(4, 2, 16, block_size=16)
    q, k = _qk(hq=4, t=80)
    full = gate.logits(q, k)
    chunk = gate.logits(q[:, :, 48:], k, q_offset=48)
    torch.testing.assert_close(chunk, full[:, :, 3:])
    ragged = gate.logits(q[:, :, 40:], k, q_offset=40)
    assert ragged.shape == (2, 4, 3, 5)
    torch.testing.assert_close(ragged[:, :, 1:], full[:, :, 3:])
    q2 = q.clone()
    q2[:, :, 32:40] = 100.0  # rows before the chunk do not reach its partial block
    torch.testing.assert_close(gate.logits(q2[:, :, 40:], k, q_offset=40), ragged)


def test_gate_projections_keep_the_gate_dtype_under_autocast(seed):
    """Under autocast the key projection comes out in bf16 while unprojected queries stay fp32; the
    gate hands both on in its own dtype (the fused score kernel refuses mixed dtypes), and the
    scores match those computed without autocast to bf16 accuracy."""
    gate = SeerGate(4, 2, 16, block_size=16)
    q, k = _qk(hq=4, t=48)
    from attn_patch.seer import pool_gate_inputs

    qb, kb = pool_gate_inputs(q, k, 16, 0)
    want = gate.raw_scores(qb, kb, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qg, kg = gate.projected(qb, kb)
        got = gate.raw_scores(qb, kb, 0)
    assert qg.dtype == kg.dtype == torch.float32
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_pooling_undoes_rope_and_skips_padding(seed):
    """Given post-RoPE q/k and the model's cos/sin, the gate pools the pre-RoPE values (partial
    rotary too); padded keys do not enter the pooled keys."""
    from attn_patch.seer.gate import pool_gate_inputs, rotate_half

    q, k = _qk(b=2, hq=4, hkv=2, t=40, d=16)
    for rot in (16, 8):
        ang = torch.randn(2, 40, rot // 2)
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1) * 1.3, torch.cat([ang.sin(), ang.sin()], -1) * 1.3

        def rope(x, cos=cos, sin=sin, rot=rot):
            c, s = cos[:, None], sin[:, None]
            return torch.cat([x[..., :rot] * c + rotate_half(x[..., :rot]) * s, x[..., rot:]], -1)

        want = pool_gate_inputs(q[:, :, 8:], k, 16, 8)
        got = pool_gate_inputs(rope(q)[:, :, 8:], rope(k), 16, 8, cos, sin)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[0, :20] = False
    _, kb = pool_gate_inputs(q, k, 16, 0, key_padding=pad)
    torch.testing.assert_close(kb[0, :, 1, 32:], k[0, :, 20:32].mean(1))
    assert (kb[0, :, 0] == 0).all()


def test_gate_errors():
    with pytest.raises(ValueError, match="power of two"):
        SeerGate(4, 2, 16, block_size=48)
    with pytest.raises(ValueError, match="q_proj=True"):
        SeerGate(4, 2, 16, gate_dim=32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        SeerGate(5, 2, 16)
    for width in (0, -16):  # 0 used to mean "the head dim"; a width is given or left out (None)
        with pytest.raises(ValueError, match=f"gate_dim must be a positive number of channels, got {width}"):
            SeerGate(4, 2, 16, gate_dim=width, q_proj=True)


def test_ground_truth_matches_the_dense_probabilities(seed):
    q, k = _qk(b=1, hq=4, hkv=2, t=37, d=8)
    gt = ground_truth_reference(q, k, block_size=16)
    kk = k.repeat_interleave(2, dim=1)
    s = (q @ kk.transpose(-1, -2)) * 8 ** -0.5
    s = s.masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)
    want = torch.zeros(1, 4, 3, 3)
    for i in range(3):
        for j in range(3):
            block = p[:, :, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16]
            want[:, :, i, j] = block.amax(dim=(-1, -2))
    want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(gt, want)
    assert (gt[..., ~block_causal_mask(3, 3)] == 0).all()


def test_select_blocks(seed):
    probs = torch.softmax(torch.randn(2, 3, 8, 8).masked_fill(~block_causal_mask(8, 8), float("-inf")), -1)
    idx, cnt = select_blocks(probs, density=1.0)
    assert (cnt == torch.arange(1, 9)).all()  # every visible block
    idx, cnt = select_blocks(probs, density=0.3)
    for b in range(2):
        for h in range(3):
            for i in range(8):
                row = idx[b, h, i, : cnt[b, h, i]].tolist()
                assert row == sorted(set(row)) and all(j <= i for j in row)
                assert 0 in row and i in row  # sink and diagonal kept
    assert 0.2 < float(achieved_density(cnt, 8).mean()) < 0.7
    idx, cnt = select_blocks(probs, threshold=2.0, keep_sink=False)  # nothing passes: diagonal only
    assert (cnt == 1).all() and (idx[..., 0] == torch.arange(8)).all()
    # a floor: with a threshold nothing passes, min_density keeps exactly density's top-k; with one
    # that some blocks pass, the union of both
    for d in (0.3, 0.6):
        want = select_blocks(probs, density=d)
        got = select_blocks(probs, threshold=2.0, min_density=d)
        assert torch.equal(got[1], want[1]) and all(
            got[0][b, h, i, : got[1][b, h, i]].tolist() == want[0][b, h, i, : want[1][b, h, i]].tolist()
            for b in range(2) for h in range(3) for i in range(8))
    thr = select_blocks(probs, threshold=0.2)[1]
    both = select_blocks(probs, threshold=0.2, min_density=0.6)[1]
    assert (both >= torch.maximum(thr, select_blocks(probs, density=0.6)[1])).all() and (both > thr).any()
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks(probs)
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks(probs, density=0.2, top_p=0.9)
    assert topk_for_density(1.0, 10) == 10 and topk_for_density(0.19, 10) == 1


def test_top_p_selection(seed):
    """top_p keeps, per row, the fewest blocks whose probabilities reach the mass (sink and diagonal
    first, then by probability), checked against a loop over the rows."""
    probs = torch.softmax(3 * torch.randn(2, 3, 9, 9).masked_fill(~block_causal_mask(9, 9), float("-inf")), -1)
    for p in (0.3, 0.8, 1.0):
        idx, cnt = select_blocks(probs, top_p=p)
        for b in range(2):
            for h in range(3):
                for i in range(9):
                    row = probs[b, h, i, : i + 1].tolist()
                    forced = sorted({0, i})
                    rest = sorted((j for j in range(i + 1) if j not in forced), key=lambda j: -row[j])
                    want, mass = list(forced), sum(row[j] for j in forced)  # always kept
                    for j in rest:
                        if mass >= p and p < 1.0:
                            break
                        want.append(j)
                        mass += row[j]
                    assert idx[b, h, i, : cnt[b, h, i]].tolist() == sorted(want), (p, b, h, i)
    dens = [float(achieved_density(select_blocks(probs, top_p=p)[1], 9).mean()) for p in (0.3, 0.8, 1.0)]
    assert dens[0] < dens[1] < dens[2] == 1.0


def test_benchmark_selection_and_flex_block_mask(seed):
    """The sparse benchmark's random selections have the requested density, and the BlockMask
    FlexAttention gets covers exactly the selected blocks (causal inside the diagonal block)."""
    from attn_patch.evals.bench_sparse import flex_block_mask, random_selection
    from attn_patch.kernels.reference import block_sparse_to_dense

    idx, cnt = random_selection(1, 4, 12, 12, 0.3, "cpu")
    assert 0.2 < float(achieved_density(cnt, 12).mean()) < 0.5
    mask = flex_block_mask(idx, cnt, 16)
    dense = mask.to_dense()  # [B, H, NQB, NKB] block map
    want = block_sparse_to_dense(idx, cnt, 12, 12, 1)
    assert torch.equal(dense.bool(), want)


def test_heads_allocation_shares_the_row_budget(seed):
    """allocation='heads': per row the heads keep k * H blocks in all (a focused head fewer, a diffuse
    one more), each keeps its sink and diagonal, and the lists stay sorted and causal."""
    logits = torch.randn(2, 4, 10, 10)
    logits[:, 0] *= 8.0  # head 0 very focused
    probs = torch.softmax(logits.masked_fill(~block_causal_mask(10, 10), float("-inf")), -1)
    idx, cnt = select_blocks(probs, density=0.4, allocation="heads")
    u_idx, u_cnt = select_blocks(probs, density=0.4)
    torch.testing.assert_close(cnt.sum(1), u_cnt.sum(1))  # same blocks per row over the heads
    assert not torch.equal(cnt, u_cnt)
    for b in range(2):
        for h in range(4):
            for i in range(10):
                row = idx[b, h, i, : cnt[b, h, i]].tolist()
                assert row == sorted(set(row)) and all(j <= i for j in row) and 0 in row and i in row
