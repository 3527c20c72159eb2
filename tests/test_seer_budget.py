"""allocation="calibrated": per-head densities in the selection kernel and its reference, the attention
mass a selection keeps, the budget allocation, calibrate() and its files."""
import itertools
import json

import pytest
import torch
from conftest import DEVICE, has_triton
from tiny_models import build

import attn_patch
from attn_patch.errors import ConfigError
from attn_patch.seer import (allocate_budget, block_mass_reference, calibrate, gates_of, kept_mass_curve, save_gates,
                             select_blocks)
from attn_patch.seer.blocks import topk_for_layout
from attn_patch.seer.method import plan_budget

needs_triton = pytest.mark.skipif(not has_triton(), reason="no triton")


def _causal_probs(b, h, nq, nk):
    scores = torch.randn(b, h, nq, nk, device=DEVICE)
    visible = torch.ones(nq, nk, dtype=torch.bool, device=DEVICE).tril(nk - nq)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)


@pytest.mark.parametrize("nq,nk", [(9, 9), (5, 14)])
def test_per_head_density_selects_each_heads_own_top_k(seed, nq, nk):
    """Head h of a per-head selection is exactly the uniform selection at density d_h."""
    probs = _causal_probs(2, 3, nq, nk)
    dens = [0.2, 0.9, 0.5]
    idx, cnt = select_blocks(probs, density=dens)
    for h, d in enumerate(dens):
        uidx, ucnt = select_blocks(probs[:, h:h + 1], density=d)
        assert torch.equal(cnt[:, h], ucnt[:, 0]), f"seed {seed}, head {h}"
        for row in itertools.product(range(2), range(nq)):
            n = int(cnt[row[0], h, row[1]])
            assert idx[row[0], h, row[1], :n].tolist() == uidx[row[0], 0, row[1], :n].tolist()
    with pytest.raises(ValueError, match="one value per head"):
        select_blocks(probs, density=[0.2, 0.5])


@needs_triton
@pytest.mark.parametrize("nq,nk", [(8, 8), (5, 13)])
def test_selection_kernel_takes_a_k_per_head(seed, nq, nk):
    """The one-kernel selection with a k per head keeps what select_blocks keeps at those densities."""
    from attn_patch.kernels.seer_select import topk_block_lists

    probs = _causal_probs(2, 3, nq, nk)
    dens = [0.3, 1.0, 0.6]
    off = nk - nq
    idx, cnt = topk_block_lists(probs, [topk_for_layout(d, nq, nk, off) for d in dens])
    ridx, rcnt = select_blocks(probs, density=dens)
    assert torch.equal(cnt, rcnt), f"seed {seed}"
    assert idx.shape[-1] == ridx.shape[-1] == max(topk_for_layout(d, nq, nk, off) for d in dens)
    for row in range(cnt.numel()):
        n = int(cnt.flatten()[row])
        assert idx.flatten(0, 2)[row, :n].tolist() == ridx.flatten(0, 2)[row, :n].tolist()
    with pytest.raises(ValueError, match="per-head k"):
        topk_block_lists(probs, [2, 3])


@pytest.mark.parametrize("t,hq,hkv,rows", [(45, 4, 2, 1024), (64, 3, 1, 16), (50, 2, 2, 32)])
def test_block_mass_matches_the_dense_probabilities(seed, t, hq, hkv, rows):
    """Summing the exact causal softmax into (query block, key block) cells, in row chunks of any
    size (ragged last block, GQA)."""
    q = torch.randn(2, hq, t, 16, device=DEVICE)
    k = torch.randn(2, hkv, t, 16, device=DEVICE)
    got = block_mass_reference(q, k, block_size=16, rows_per_step=rows)
    kk = k.repeat_interleave(hq // hkv, dim=1)
    s = (q @ kk.transpose(-1, -2)) * 16 ** -0.5
    p = torch.softmax(s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=DEVICE).triu(1), float("-inf")), -1)
    nb = -(-t // 16)
    want = torch.zeros(2, hq, nb, nb, device=DEVICE)
    for i in range(nb):
        for j in range(nb):
            want[:, :, i, j] = p[:, :, i * 16:(i + 1) * 16, j * 16:(j + 1) * 16].sum((-1, -2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    rows_per_block = torch.tensor([min(16, t - i * 16) for i in range(nb)], device=DEVICE, dtype=torch.float32)
    torch.testing.assert_close(got.sum(-1), rows_per_block.expand(2, hq, nb))


def test_kept_mass_is_the_mass_inside_the_selected_blocks(seed):
    probs = _causal_probs(2, 3, 10, 10)
    mass = _causal_probs(2, 3, 10, 10) * 16  # any non-negative causal map
    dens = [0.1, 0.3, 0.55, 1.0]
    kept = kept_mass_curve(probs, mass, dens)
    for j, d in enumerate(dens):
        idx, cnt = select_blocks(probs, density=d)
        chosen = torch.zeros_like(mass, dtype=torch.bool)
        for b, h, r in itertools.product(range(2), range(3), range(10)):
            chosen[b, h, r, idx[b, h, r, :cnt[b, h, r]].long()] = True
        torch.testing.assert_close(kept[:, j], (mass * chosen).sum((0, 2, 3)), msg=f"seed {seed}, density {d}")
    torch.testing.assert_close(kept[:, -1], mass.sum((0, 2, 3)))


def _best_by_search(curves, dens, cost, target):
    best, best_levels = -1.0, None
    for levels in itertools.product(range(len(dens)), repeat=curves.shape[0]):
        if sum(cost[j] for j in levels) <= target * curves.shape[0] + 1e-9:
            total = sum(float(curves[u, j]) for u, j in enumerate(levels))
            if total > best + 1e-12:
                best, best_levels = total, levels
    return best, best_levels


def test_allocation_keeps_the_most_mass_for_the_budget(seed):
    """On concave curves the greedy allocation is within one step's gain of the exhaustive-search
    optimum (the most any greedy by marginal gain can lose to the last indivisible step), and never
    spends past the mean, with the costs as given."""
    dens = [0.05, 0.1, 0.2, 0.4, 1.0]
    g = torch.Generator().manual_seed(seed)
    slopes = torch.rand(3, 4, generator=g).sort(dim=-1, descending=True).values  # concave: slopes fall
    curves = torch.cat([torch.zeros(3, 1), (slopes * torch.tensor(dens).diff()).cumsum(dim=-1)], dim=-1)
    step = float(curves.diff(dim=-1).max())
    for target in (0.08, 0.15, 0.3, 0.6):
        got = allocate_budget(curves, dens, target)
        levels = [dens.index(float(d)) for d in got]
        assert sum(dens[j] for j in levels) / 3 <= target + 1e-9
        best, _ = _best_by_search(curves, dens, dens, target)
        total = sum(float(curves[u, j]) for u, j in enumerate(levels))
        assert best - step - 1e-9 <= total <= best + 1e-9, (seed, target, total, best)
    cost = [0.08, 0.12, 0.2, 0.4, 1.0]  # what the levels really select: the budget counts these
    for target in (0.08, 0.15, 0.3):
        got = allocate_budget(curves, dens, target, cost)
        assert sum(cost[dens.index(float(d))] for d in got) / 3 <= target + 1e-9
    with pytest.raises(ValueError, match="below the lowest"):
        allocate_budget(curves, dens, 0.05, cost)
    lopsided = torch.tensor([[0.9, 0.95, 0.97, 0.99, 1.0], [0.1, 0.2, 0.4, 0.7, 1.0]])
    assert allocate_budget(lopsided, dens, 0.3).tolist() == [0.2, 0.4]  # the diffuse head first, then the rest


def test_plan_gives_the_costly_layer_more_density():
    """With measured layer losses, a layer whose sparsity costs much gets more of the budget; its
    heads then share it by kept mass."""
    dens = [0.05, 0.1, 0.2, 0.5, 1.0]
    kept = [[[0.5, 0.7, 0.85, 0.95, 1.0], [0.9, 0.95, 0.98, 0.99, 1.0]]] * 2
    cal = {"densities": dens, "cost": dens, "kept": kept}
    flat = plan_budget(cal, 0.2)  # by mass alone the two layers are the same
    assert flat[0] == flat[1]
    cal["layer_loss"] = {"densities": [0.05, 0.1, 0.2, 0.5], "delta": [[0.5, 0.3, 0.1, 0.02], [0.01, 0.005, 0.0, 0.0]]}
    plan = plan_budget(cal, 0.3)  # layer 0 at 0.5, layer 1 at 0.1
    assert plan == [(0.5, 0.5), (0.1, 0.1)]
    assert sum(map(sum, plan)) / 4 <= 0.3 + 1e-9


def _gated(seed, tmp_path):
    torch.manual_seed(seed)
    model = build("llama").to(DEVICE)
    attn_patch.apply(model, "seer", gates="untrained", block_size=16, min_length=0, dense_last=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates_of(model):
            gate.k_weight.add_(torch.randn(gate.k_weight.shape, generator=g).to(gate.k_weight) * 0.5)
    path = save_gates(model, tmp_path / "gates")
    attn_patch.remove(model)
    return model, path


def test_calibrate_writes_a_calibration_the_gates_then_use(seed, tmp_path):
    model, path = _gated(seed, tmp_path)
    ids = torch.randint(1, 96, (2, 128), device=DEVICE)
    with torch.no_grad():  # the unpatched model's loss, per window
        dense_loss = sum(float(model(w[None], labels=w[None]).loss) for w in ids) / 2
    attn_patch.apply(model, "seer", gates=str(path), min_length=0, dense_last=0, allocation="uniform")
    cal = calibrate(model, [ids[:1], ids[1]], save=path, source="random ids", layer_densities=(0.5, 0.7))
    assert attn_patch.stats(model)["layers"][0]["sparse_calls"] == 0  # calibration leaves no stats behind
    attn_patch.remove(model)
    saved = json.loads((path / "calibration.json").read_text())
    assert saved["tokens"] == 256 and saved["windows"] == 2 and len(saved["gates_sha256"]) == 64
    kept = torch.tensor(saved["kept"])
    assert kept.shape == (2, 6, len(saved["densities"]))  # layers, query heads, densities
    assert (kept.diff(dim=-1) >= -1e-6).all() and torch.allclose(kept[..., -1], torch.ones(2, 6))
    assert (kept[..., 0] < 1).all()
    loss = saved["layer_loss"]
    assert loss["densities"][-1] == 0.7 and len(loss["delta"]) == 2 and cal["layer_loss"] == loss
    assert abs(loss["base_loss"] - dense_loss) < 1e-4  # the probes start from the dense model
    assert any(abs(x) > 1e-6 for row in loss["delta"] for x in row)  # and one sparse layer changes it

    # default allocation: calibrated, because the file is there; stats name it
    attn_patch.apply(model, "seer", gates=str(path), density=0.7, min_length=0, dense_last=0)
    with torch.no_grad():
        model(ids)
    st = attn_patch.stats(model)
    assert st["config"]["allocation"] == "calibrated" and len(st["budget"]) == 2 and len(st["budget"][0]) == 6
    assert all(d in saved["densities"] for row in st["budget"] for d in row)
    attn_patch.remove(model)
    attn_patch.apply(model, "seer", gates=str(path), density=0.7, min_length=0, allocation="uniform")
    assert attn_patch.stats(model)["config"]["allocation"] == "uniform" and "budget" not in attn_patch.stats(model)
    attn_patch.remove(model)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_calibrated_budget_runs_on_the_kernels_as_in_the_reference(seed, tmp_path, backend):
    """The patched model with a per-head budget: the Triton path equals the PyTorch reference, and
    each head's achieved density follows its budget."""
    model, path = _gated(seed, tmp_path)
    ids = torch.randint(1, 96, (1, 160), device=DEVICE)
    with attn_patch.patched(model, "seer", gates=str(path), min_length=0, allocation="uniform"):
        calibrate(model, [ids], save=path, layer_densities=())
    outs = {}
    for be in ("reference", backend):
        with attn_patch.patched(model, "seer", gates=str(path), density=0.5, min_length=0, dense_last=0,
                                backend=be), torch.no_grad():
            outs[be] = model(ids).logits
            st = attn_patch.stats(model)
    torch.testing.assert_close(outs[backend], outs["reference"], rtol=2e-4, atol=2e-4, msg=f"seed {seed}")
    for layer, budget in zip(st["layers"], st["budget"]):
        order = sorted(range(6), key=lambda h: budget[h])
        got = [layer["heads"][h] for h in order]
        assert got == sorted(got), (budget, layer["heads"])  # more budget, more blocks


def test_calibration_errors_name_the_fix(seed, tmp_path):
    model, path = _gated(seed, tmp_path)
    with pytest.raises(ConfigError, match="needs a calibration"):
        attn_patch.apply(model, "seer", gates=str(path), allocation="calibrated")
    with pytest.raises(ConfigError, match="untrained gates have no"):
        attn_patch.apply(model, "seer", gates="untrained", allocation="calibrated")
    with pytest.raises(ConfigError, match="does not combine with threshold"):
        attn_patch.apply(model, "seer", gates=str(path), allocation="calibrated", threshold=0.1)
    ids = torch.randint(1, 96, (1, 128), device=DEVICE)
    with attn_patch.patched(model, "seer", gates=str(path), min_length=0):
        with pytest.raises(ConfigError, match="are shorter than"):
            calibrate(model, [ids[:, :8]])
        calibrate(model, [ids], save=path, layer_densities=())
    with pytest.raises(ConfigError, match="below the lowest"):  # 8 blocks: the forced ones are ~40%
        attn_patch.apply(model, "seer", gates=str(path), density=0.1)
    with pytest.raises(ConfigError, match="keep_sink=True, this apply asks for keep_sink=False"):
        attn_patch.apply(model, "seer", gates=str(path), density=0.7, keep_sink=False)
    other = build("llama").to(DEVICE)
    attn_patch.apply(other, "seer", gates="untrained", block_size=16)
    save_gates(other, path)  # new gates over the calibrated ones
    attn_patch.remove(other)
    with pytest.raises(ConfigError, match="other gates"):
        attn_patch.apply(model, "seer", gates=str(path), density=0.7)


def _flat_calibration(densities, layer_densities, layers=2, units=6) -> dict:
    """A calibration of ``densities`` whose kept mass rises evenly, with layer losses measured at
    ``layer_densities``."""
    kept = [[[(j + 1) / len(densities) for j in range(len(densities))]] * units] * layers
    delta = [[0.1 / (j + 1) for j in range(len(layer_densities))]] * layers
    return {"selection": "head", "block_size": 16, "keep_sink": True, "keep_diagonal": True,
            "densities": list(densities), "cost": list(densities), "kept": kept,
            "layer_loss": {"densities": list(layer_densities), "base_loss": 3.0, "delta": delta}}


def test_a_density_outside_the_calibrated_range_is_an_error(seed, tmp_path):
    """Below the lowest layer density measured, or above every unit at its highest level, the plan
    cannot reach the mean asked for: apply() refuses it (it used to run the nearest plan), naming the
    range and the ways out; allocation='uniform' runs any density."""
    from attn_patch.seer import weights as W

    model, path = _gated(seed, tmp_path)
    W.save_calibration(_flat_calibration([0.1, 0.2, 0.5, 0.8], [0.3, 0.5]), path)
    for density, side in ((0.2, "below the lowest"), (0.9, "above the highest")):
        with pytest.raises(ConfigError, match=f"calibration at {path}.*density {density} is {side} mean density "
                                              "the calibration offers \\(0.3 to 0.8.*allocation='uniform'"):
            attn_patch.apply(model, "seer", gates=path, density=density)
        assert attn_patch.patch_state(model) is None
        with attn_patch.patched(model, "seer", gates=path, density=density, allocation="uniform"):
            pass
    for density in (0.3, 0.8):
        with attn_patch.patched(model, "seer", gates=path, density=density):
            budget = [d for g in gates_of(model) for d in g.budget]
            assert sum(budget) / len(budget) <= density + 1e-9


def test_the_shipped_calibration_refuses_densities_below_its_range():
    """The shipped SmolLM2 calibration measured layer losses from its lowest layer density up: a mean
    below that is an error, not that density's plan."""
    from attn_patch.seer import weights as W

    shipped = W.SHIPPED["smollm2-135m-instruct"]
    cal = W.read_calibration(shipped, shipped)
    low, high = cal["layer_loss"]["densities"][0], cal["cost"][-1]
    for density in (0.01, low / 2):
        with pytest.raises(ValueError, match=f"below the lowest .*\\({low:.4g} to {high:.4g};"):
            plan_budget(cal, density)
    plan = plan_budget(cal, low)
    assert sum(map(sum, plan)) / sum(map(len, plan)) <= low + 1e-9
