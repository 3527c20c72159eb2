"""apply(model, "moh"): routers, the routed kernel inside whole models, losses, stats, save/load."""
import pytest
import torch
from conftest import DEVICE, has_triton
from tiny_models import FAMILIES, build, left_padded_batch

import attn_patch
from attn_patch.errors import ConfigError, PatchStateError
from attn_patch.moh import MoHRouter, balance_loss, head_split, routers_of

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not has_triton(), reason="no triton"))
KERNEL = "triton" if has_triton() else "reference"


def _model(family, seed, train=False):
    torch.manual_seed(seed)
    model = build(family).to(DEVICE)
    return model.train() if train else model


def _loss_and_grads(model, ids, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, use_cache=False, **inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("router", ["norm", "learned"])
@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_equals_reference_in_every_family(family, router, seed):
    """Logits and every gradient (model and router) on the routed kernel equal the masked reference;
    the routed model differs from the dense one."""
    model = _model(family, seed, train=True)
    ids = torch.randint(1, 90, (2, 37), device=DEVICE)
    dense, _ = _loss_and_grads(model, ids)
    got = {}
    extra = {"routers": "untrained"} if router == "learned" else {}
    for backend in ("reference", KERNEL):
        torch.manual_seed(seed)  # same fresh router weights
        with attn_patch.patched(model, "moh", backend=backend, router=router, active=0.5, **extra):
            got[backend] = _loss_and_grads(model, ids)
    (rl, rg), (kl, kg) = got["reference"], got[KERNEL]
    torch.testing.assert_close(kl, rl, rtol=2e-4, atol=2e-5, msg=f"seed {seed}")
    assert kg.keys() == rg.keys()
    for name in rg:
        torch.testing.assert_close(kg[name], rg[name], rtol=2e-4, atol=3e-5, msg=f"{name}, seed {seed}")
    if router == "learned":
        assert any("moh_router" in n for n in rg), "learned routers must receive gradients"
    assert (rl - dense).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_all_heads_active_equals_dense(backend, seed):
    model = _model("llama", seed)
    ids = torch.randint(1, 90, (2, 29), device=DEVICE)
    with torch.no_grad():
        dense = model(ids).logits
        with attn_patch.patched(model, "moh", backend=backend, active=1.0):
            routed = model(ids).logits
            assert attn_patch.stats(model)["active"] == 1.0
    torch.testing.assert_close(routed, dense, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("router", ["norm", "predict"])
@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_all_heads_active_trains_as_dense(router, backend, seed):
    """With every head active the binary-gate routers are not run: the logits and every gradient equal
    the unpatched model's (no straight-through term reaches the queries, the router gets no gradient),
    and there is no balance to keep."""
    from attn_patch.moh import calibrate

    model = _model("llama", seed, train=True)
    ids = torch.randint(1, 90, (2, 24), device=DEVICE)
    dense, dense_grads = _loss_and_grads(model, ids)
    with attn_patch.patched(model, "moh", backend=backend, router=router, active=1.0):
        if router == "predict":
            calibrate(model, [torch.randint(1, 90, (2, 16), device=DEVICE)])
        logits, grads = _loss_and_grads(model, ids)
        assert attn_patch.aux_loss(model).item() == 0.0
    torch.testing.assert_close(logits, dense, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    assert grads.keys() == dense_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], dense_grads[name], rtol=1e-4, atol=1e-6, msg=f"{name}, seed {seed}")


def test_learned_router_weights_heads_with_every_head_active(seed):
    """A learned router's gates are head weights (its model), not a selection: with every head active it
    still scales the heads and learns from the LM loss; its balance loss (constant there) is a zero."""
    model = _model("llama", seed, train=True)
    ids = torch.randint(1, 90, (2, 24), device=DEVICE)
    with attn_patch.patched(model, "moh", backend="reference", router="learned", routers="untrained", active=1.0):
        _, grads = _loss_and_grads(model, ids)
        assert attn_patch.aux_loss(model).item() == 0.0
    for i in range(2):
        assert grads[f"model.layers.{i}.self_attn.moh_router.route.weight"].abs().max() > 0


def test_head_split():
    assert head_split(32, 0.75, None, None) == (12, 12)
    assert head_split(32, 0.5, None, None) == (8, 8)
    assert head_split(9, 0.75, None, None) == (3, 4)
    assert head_split(9, 0.5, None, None) == (2, 3)  # 4.5 heads: rounded up
    assert head_split(32, None, 16, 8) == (16, 8)  # MoH-LLaMA3
    assert head_split(8, 1.0, None, None) == (4, 4)
    with pytest.raises(ConfigError, match="routes nothing"):
        head_split(8, 0.5, 4, None)
    with pytest.raises(ConfigError, match="cannot have"):
        head_split(8, None, 6, 4)


def test_balance_loss_by_hand():
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], [[0.3, 0.3, 0.4], [0.5, 0.25, 0.25]]])
    picked = probs.topk(2, dim=-1).indices
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, picked, True)
    # by hand over the 4 tokens: P_i = mean probability, f_i = picks of head i / (4 tokens * top-2)
    p = [(0.7 + 0.1 + 0.3 + 0.5) / 4, (0.2 + 0.6 + 0.3 + 0.25) / 4, (0.1 + 0.3 + 0.4 + 0.25) / 4]
    picks = [0, 0, 0]
    for row in mask.reshape(-1, 3).tolist():
        for i, on in enumerate(row):
            picks[i] += on
    want = 3 * sum(p[i] * picks[i] / 8 for i in range(3))
    assert balance_loss(probs, mask, 2).item() == pytest.approx(want, rel=1e-6)
    valid = torch.tensor([[True, False], [True, True]])
    p3 = [(0.7 + 0.3 + 0.5) / 3, (0.2 + 0.3 + 0.25) / 3, (0.1 + 0.4 + 0.25) / 3]
    picks3 = [0, 0, 0]
    for row in mask[valid].tolist():
        for i, on in enumerate(row):
            picks3[i] += on
    want3 = 3 * sum(p3[i] * picks3[i] / 6 for i in range(3))
    assert balance_loss(probs, mask, 2, valid).item() == pytest.approx(want3, rel=1e-6)
    uniform = torch.full((5, 4), 0.25)
    assert balance_loss(uniform, torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]] * 2 + [[1, 0, 1, 0]]).bool(), 2).item() \
        == pytest.approx(1.0)


def test_norm_router_straight_through(seed):
    """Binary gates (value 1 / 0) whose gradient is the routing probabilities': the query gets a
    gradient through the gates alone."""
    router = MoHRouter("norm", 6, 2, 2)
    q = torch.randn(2, 6, 11, 8, requires_grad=True)
    gates, mask, probs = router(q)
    assert torch.equal(gates.detach(), mask.float()), "forward gates are exactly the binary selection"
    assert mask[..., :2].all() and (mask.sum(-1) == 4).all()
    norms = q.detach().norm(dim=-1).transpose(1, 2)
    want = (norms[..., 2:] / norms.std(-1, keepdim=True, correction=0)).topk(2, dim=-1).indices + 2
    assert torch.equal(mask[..., 2:].nonzero(), torch.zeros_like(mask).scatter_(-1, want, True)[..., 2:].nonzero())
    (gates * torch.randn_like(gates)).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0, f"seed {seed}: no straight-through gradient"


def test_norm_router_gradient_reaches_query_projection(seed):
    """In a model, the STE term changes q_proj's gradient (it is the only path besides attention)."""
    model = _model("llama", seed, train=True)
    ids = torch.randint(1, 90, (1, 24), device=DEVICE)
    with attn_patch.patched(model, "moh", backend="reference", active=0.5):
        _, with_ste = _loss_and_grads(model, ids)
        r = routers_of(model)[0]
        orig = MoHRouter.forward

        def no_ste(self, query):
            gates, mask, probs = orig(self, query)
            return gates.detach(), mask, probs

        MoHRouter.forward = no_ste
        try:
            _, without = _loss_and_grads(model, ids)
        finally:
            MoHRouter.forward = orig
    assert r.kind == "norm"
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (with_ste[name] - without[name]).abs().max() > 1e-7


def test_learned_router_starts_near_dense_restricted(seed):
    """Untrained learned routers weight every computed head by ~1 (zero mixing / shared weights,
    tiny routing weights)."""
    router = MoHRouter("learned", 8, 2, 3, hidden_size=16)
    router._hidden = torch.randn(2, 5, 16)
    gates, mask, _ = router(torch.randn(2, 8, 5, 4))
    assert (mask.sum(-1) == 5).all()
    on = gates[mask]
    assert torch.allclose(on, torch.ones_like(on), atol=0.05) and (gates[~mask] == 0).all()


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_cached_decoding_matches_full_forward(backend, seed):
    """Routing is per token, so decoding token by token on the KV cache gives the full forward's logits."""
    model = _model("llama", seed)
    ids = torch.randint(1, 90, (2, 20), device=DEVICE)
    with attn_patch.patched(model, "moh", backend=backend, active=0.5), torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :14], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(14, 20):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
        inc = torch.cat(steps, dim=1)
        gen = model.generate(ids[:, :14], max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(inc, full, rtol=2e-4, atol=2e-5, msg=f"seed {seed}")
    assert gen.shape == (2, 18)


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_left_padding_row_equals_row_alone(backend, seed):
    model = _model("qwen2", seed)
    ids, mask = left_padded_batch([19, 11], 19, torch.Generator().manual_seed(seed))
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    with attn_patch.patched(model, "moh", backend=backend, active=0.5), torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 8:]).logits
        st = attn_patch.stats(model)
    torch.testing.assert_close(batch[1, 8:], alone[0], rtol=2e-4, atol=2e-5, msg=f"seed {seed}")
    # padding is not counted: 19 + 11 real tokens in the batch, 11 alone
    assert st["layers"][0]["tokens"] == 19 + 11 + 11


def test_stats_and_aux_loss(seed):
    model = _model("llama", seed, train=True)
    ids = torch.randint(1, 90, (2, 25), device=DEVICE)
    attn_patch.apply(model, "moh", backend="reference", active=0.5)  # 6 heads: 1 shared + top-2 of 5
    with pytest.raises(PatchStateError, match="training mode"):
        attn_patch.aux_loss(model)
    out = model(ids, labels=ids)
    aux = attn_patch.aux_loss(model)
    assert aux.requires_grad and aux.item() > 0
    # two layers, each about 1 when balanced, times the default weight 0.01
    assert 0.01 * 2 * 0.5 < aux.item() < 0.01 * 2 * 5
    (out.loss + aux).backward()
    st = attn_patch.stats(model)
    assert st["shared"] == 1 and st["top_k"] == 2 and st["active"] == pytest.approx(0.5)
    for layer in st["layers"]:
        assert layer["utilisation"][0] == 1.0 and sum(layer["utilisation"]) == pytest.approx(3.0)
        assert layer["tokens"] == 50
    attn_patch.stats(model, reset=True)
    assert attn_patch.stats(model)["layers"][0]["tokens"] == 0
    model.eval()
    with torch.no_grad():
        model(ids)
    with pytest.raises(PatchStateError):
        attn_patch.aux_loss(model)  # eval forwards record no loss
    attn_patch.remove(model)


def test_save_load_round_trip_and_strict_loading(tmp_path, seed):
    from attn_patch.moh import save_routers

    model = _model("llama", seed)
    ids = torch.randint(1, 90, (1, 30), device=DEVICE)
    with attn_patch.patched(model, "moh", router="learned", routers="untrained", active=0.5), torch.no_grad():
        for r in routers_of(model):
            for p in r.parameters():
                p.normal_(std=0.3)
        want = model(ids).logits
        save_routers(model, tmp_path / "r", training={"steps": 1})
    with attn_patch.patched(model, "moh", routers=str(tmp_path / "r")), torch.no_grad():
        got = model(ids).logits
        assert routers_of(model)[0].kind == "learned"
    torch.testing.assert_close(got, want)
    with pytest.raises(ConfigError, match="differ from the routers"):
        attn_patch.apply(model, "moh", routers=str(tmp_path / "r"), top_k=1)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "r" / "routers.safetensors"))
    tensors.pop("layers.1.mix.weight")
    save_file(tensors, str(tmp_path / "r" / "routers.safetensors"))
    with pytest.raises(ConfigError, match="missing"):
        attn_patch.apply(model, "moh", routers=str(tmp_path / "r"))
    other = build("llama", num_hidden_layers=3).to(DEVICE)
    with pytest.raises(ConfigError, match="another model shape"):
        attn_patch.apply(other, "moh", routers=str(tmp_path / "r"))
    assert attn_patch.patch_state(model) is None and attn_patch.patch_state(other) is None


def test_config_errors_and_exact_remove(seed):
    model = _model("gpt2", seed)
    with pytest.raises(ConfigError, match="needs trained routers"):
        attn_patch.apply(model, "moh", router="learned")
    with pytest.raises(ConfigError, match="no weights"):
        attn_patch.apply(model, "moh", routers="untrained")
    with pytest.raises(ConfigError, match="no MoH router config"):
        attn_patch.apply(model, "moh", routers="/nonexistent/routers")
    with pytest.raises(ConfigError, match="active"):
        attn_patch.apply(model, "moh", active=1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [len(m._forward_pre_hooks) for m in model.modules()]
    attn_patch.apply(model, "moh", router="learned", routers="untrained")
    assert any("moh_router" in k for k in model.state_dict())
    attn_patch.remove(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [len(m._forward_pre_hooks) for m in model.modules()] == hooks
    assert "moh" in attn_patch.methods()


@pytest.mark.parametrize("family", FAMILIES)
def test_calibrate_shares_the_heads_that_matter(family, seed):
    """calibrate() ranks heads by what they add to the residual: a head scaled up in the output
    projection becomes the first shared head, a head cut out of it the last routed one; shared heads
    are then on for every token, and the kernel path still equals the reference path."""
    from attn_patch.families import attention_modules, head_output_maps
    from attn_patch.moh import calibrate

    model = _model(family, seed, train=True)
    h = model.config.num_attention_heads
    with torch.no_grad():
        for m in attention_modules(model):
            maps = head_output_maps(m, h)  # a view of the projection's weight
            maps[h - 1].mul_(20.0)
            maps[0].zero_()
    ids = torch.randint(1, 90, (2, 33), device=DEVICE)
    got = {}
    for backend in ("reference", KERNEL):
        with attn_patch.patched(model, "moh", backend=backend, active=0.5):
            info = calibrate(model, [ids[:1], ids[1]], source="test")
            assert info["tokens"] == 66 and info["batches"] == 2 and model.training
            for r in routers_of(model):
                assert r.head_order[0] == h - 1 and r.head_order[-1] == 0
                assert sorted(r.head_order.tolist()) == list(range(h))
            got[backend] = _loss_and_grads(model, ids)
            st = attn_patch.stats(model)
            for layer in st["layers"]:
                assert layer["shared_heads"][0] == h - 1
                assert all(layer["utilisation"][j] == 1.0 for j in layer["shared_heads"])
                assert layer["utilisation"][0] < 1.0 or st["shared"] + st["top_k"] == h
    (rl, rg), (kl, kg) = got["reference"], got[KERNEL]
    torch.testing.assert_close(kl, rl, rtol=2e-4, atol=2e-5, msg=f"seed {seed}")
    for name in rg:
        torch.testing.assert_close(kg[name], rg[name], rtol=2e-4, atol=3e-5, msg=f"{name}, seed {seed}")


def test_calibrated_norm_scales_and_round_trip(tmp_path, seed):
    """norm_scale is each head's mean query norm; a saved calibrated norm router loads back with the
    same order and scales (same logits); a head order that is not a permutation, or missing
    calibration tensors, is an error; version-1 norm routers (no tensors) load as uncalibrated."""
    import json

    from safetensors.torch import load_file, save_file

    from attn_patch.families import attention_modules
    from attn_patch.moh import calibrate, save_routers

    model = _model("llama", seed)
    ids = torch.randint(1, 90, (1, 40), device=DEVICE)
    h, d = model.config.num_attention_heads, model.config.head_dim
    seen = []
    hooks = [m.q_proj.register_forward_hook(lambda _m, _a, out: seen.append(out.view(1, 40, h, d).norm(dim=-1)))
             for m in attention_modules(model)]
    with torch.no_grad(), attn_patch.patched(model, "moh", backend="reference", active=0.5):
        calibrate(model, [ids])
        for hk in hooks:
            hk.remove()
        for r, q in zip(routers_of(model), seen):
            torch.testing.assert_close(r.norm_scale, q.mean((0, 1)), rtol=1e-5, atol=1e-6)
        assert any(not torch.equal(r.head_order, torch.arange(h, device=DEVICE)) for r in routers_of(model))
        want = model(ids).logits
        save_routers(model, tmp_path / "r")
    with torch.no_grad(), attn_patch.patched(model, "moh", backend="reference", routers=str(tmp_path / "r")):
        torch.testing.assert_close(model(ids).logits, want)
        assert routers_of(model)[0].runtime.calibration["tokens"] == 40
    tensors = load_file(str(tmp_path / "r" / "routers.safetensors"))
    bad = dict(tensors, **{"layers.0.head_order": torch.zeros(h, dtype=torch.int64)})
    save_file(bad, str(tmp_path / "r" / "routers.safetensors"))
    with pytest.raises(ConfigError, match="not a permutation"):
        attn_patch.apply(model, "moh", routers=str(tmp_path / "r"))
    tensors.pop("layers.1.norm_scale")
    save_file(tensors, str(tmp_path / "r" / "routers.safetensors"))
    with pytest.raises(ConfigError, match="missing"):
        attn_patch.apply(model, "moh", routers=str(tmp_path / "r"))
    (tmp_path / "r" / "routers.safetensors").unlink()
    with pytest.raises(ConfigError, match="is missing"):
        attn_patch.apply(model, "moh", routers=str(tmp_path / "r"))
    meta = json.loads((tmp_path / "r" / "config.json").read_text())
    (tmp_path / "r" / "config.json").write_text(json.dumps(dict(meta, version=1)))
    with torch.no_grad(), attn_patch.patched(model, "moh", backend="reference", routers=str(tmp_path / "r")):
        for r in routers_of(model):
            assert torch.equal(r.head_order.cpu(), torch.arange(h)) and torch.all(r.norm_scale == 1)


def test_learned_top1_router_gets_a_gradient():
    """The paper's gates (softmax probability, not renormalised over the top-k) give a top-1 router a
    gradient from the outputs; renormalising (format version 2) makes a top-1 gate constant 1."""
    torch.manual_seed(0)
    for gates, moves in (("scaled", True), ("renormalised", False)):  # renormalised: rounding noise only
        router = MoHRouter("learned", 8, 6, 1, hidden_size=16, gates=gates)
        router._hidden = torch.randn(2, 5, 16)
        g, mask, _ = router(torch.randn(2, 8, 5, 4))
        assert (mask.sum(-1) == 7).all()
        (g * torch.randn_like(g)).sum().backward()
        grad = router.route.weight.grad
        assert (float(grad.abs().max()) > 1e-4) == moves, (gates, float(grad.abs().max()))


def _weight_layer(model, layer, factor):
    from attn_patch.families import attention_modules, output_projection

    with torch.no_grad():
        output_projection(attention_modules(model)[layer]).weight.mul_(factor)


def test_allocate_gives_heads_where_dropping_costs(monkeypatch, seed):
    """allocate() probes one layer at a time (a layer whose output projection is zero costs nothing
    at any head count) and hands the heads to the layers where dropping costs the most, within the
    budget (checked on a loss with known per-layer costs); without calibration it refuses."""
    import attn_patch.moh as moh

    torch.manual_seed(seed)
    model = build("llama", num_hidden_layers=3).to(DEVICE)
    _weight_layer(model, 2, 0.0)
    h = model.config.num_attention_heads
    ids = torch.randint(1, 90, (2, 40), device=DEVICE)
    with attn_patch.patched(model, "moh", backend="reference", active=0.5):
        with pytest.raises(ConfigError, match="calibrate"):
            moh.allocate(model, [ids])
        moh.calibrate(model, [ids])
        with pytest.raises(ConfigError, match="fewer than min_heads"):
            moh.allocate(model, [ids], active=0.2, min_heads=2)
        got = moh.allocate(model, [ids], active=0.5, top_k=1)
        assert sum(got["heads"]) <= int(0.5 * 3 * h + 0.5) and got["levels"] == list(range(1, h + 1))
        assert all(abs(v) < 1e-6 for v in got["nll_rise"][2]) and any(abs(v) > 1e-6 for v in got["nll_rise"][0])

        cost = [3.0, 1.0, 0.1]  # NLL rise per dropped head in each layer

        def fake_nll(m, batches):
            return sum(c * (h - r.shared - r.top_k) for c, r in zip(cost, routers_of(m)))

        monkeypatch.setattr(moh, "_window_nll", fake_nll)
        got = moh.allocate(model, [ids], active=0.5, top_k=1)
        assert got["heads"] == [6, 2, 1] and got["mean_active"] == pytest.approx(0.5, abs=1e-4)
        assert got["nll_rise"][0][0] == pytest.approx(15.0) and got["nll_rise"][2][-1] == 0.0
        with torch.no_grad():
            model(ids)
        st = attn_patch.stats(model)
        assert st["heads_per_layer"] == [6, 2, 1] and st["active"] == pytest.approx(0.5, abs=1e-4)
        for layer, a in zip(st["layers"], [6, 2, 1]):
            assert (layer["shared"], layer["top_k"]) == ((h, 0) if a == h else (a - 1, 1))
            assert sum(layer["utilisation"]) == pytest.approx(a)


@pytest.mark.parametrize("router", ["norm", "learned"])
def test_per_layer_heads_kernel_losses_and_round_trip(tmp_path, router, seed):
    """Per-layer head counts (one layer with every head, on the dense kernel): the kernel path equals
    the reference path, forward and backward; the balance loss counts the routed layers only; the
    counts save and load back (the same logits), and options that would override them are errors."""
    from attn_patch.moh import save_routers, set_layer_heads

    model = _model("llama", seed, train=True)
    h = model.config.num_attention_heads
    ids = torch.randint(1, 90, (2, 33), device=DEVICE)
    extra = {"router": "learned", "routers": "untrained"} if router == "learned" else {}
    got = {}
    for backend in ("reference", KERNEL):
        torch.manual_seed(seed)
        with attn_patch.patched(model, "moh", backend=backend, active=0.5, **extra):
            set_layer_heads(model, [h, 3], top_k=2)
            assert [(r.shared, r.top_k) for r in routers_of(model)] == [(h, 0), (1, 2)]
            model.zero_grad(set_to_none=True)
            out = model(ids, labels=ids, use_cache=False)
            aux = attn_patch.aux_loss(model)
            assert 0.01 * 0.5 < aux.item() < 0.01 * 4  # one routed layer, about 1 when balanced
            (out.loss + aux).backward()
            got[backend] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None})
            if backend == KERNEL:
                model.eval()
                with torch.no_grad():
                    want = model(ids).logits
                save_routers(model, tmp_path / "r")
                model.train()
    (rl, rg), (kl, kg) = got["reference"], got[KERNEL]
    torch.testing.assert_close(kl, rl, rtol=2e-4, atol=2e-5, msg=f"seed {seed}")
    assert rg.keys() == kg.keys()
    for name in rg:
        torch.testing.assert_close(kg[name], rg[name], rtol=2e-4, atol=3e-5, msg=f"{name}, seed {seed}")
    model.eval()
    with attn_patch.patched(model, "moh", backend=KERNEL, routers=str(tmp_path / "r")), torch.no_grad():
        assert [(r.shared, r.top_k) for r in routers_of(model)] == [(h, 0), (1, 2)]
        torch.testing.assert_close(model(ids).logits, want)
        assert attn_patch.stats(model)["shared"] is None
    with pytest.raises(ConfigError, match="per-layer head counts"):
        attn_patch.apply(model, "moh", routers=str(tmp_path / "r"), active=0.5)
    with pytest.raises(ConfigError, match="heads with top_k"):
        with attn_patch.patched(model, "moh"):
            set_layer_heads(model, [h + 1, 3])


def test_version_2_learned_routers_keep_their_gates(tmp_path, seed):
    """Learned routers saved before version 3 renormalised their gates: they load with that form (the
    same outputs as when saved), and save back with it."""
    import json

    from attn_patch.moh import save_routers

    model = _model("llama", seed)
    ids = torch.randint(1, 90, (1, 30), device=DEVICE)
    with attn_patch.patched(model, "moh", backend="reference", router="learned", routers="untrained",
                            active=0.5), torch.no_grad():
        for r in routers_of(model):
            r.gates = "renormalised"
            for p in r.parameters():
                p.normal_(std=0.3)
        want = model(ids).logits
        save_routers(model, tmp_path / "r")
    path = tmp_path / "r" / "config.json"
    meta = json.loads(path.read_text())
    assert meta["router"]["gates"] == "renormalised"
    for key in ("gates", "layers"):
        meta["router"].pop(key)
    path.write_text(json.dumps(dict(meta, version=2)))
    with attn_patch.patched(model, "moh", backend="reference", routers=str(tmp_path / "r")), torch.no_grad():
        assert all(r.gates == "renormalised" for r in routers_of(model))
        torch.testing.assert_close(model(ids).logits, want)
        save_routers(model, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["router"]["gates"] == "renormalised"


# ------------------------------------------------------------------------------------------------
# router="predict": a linear map fitted by calibrate() to each head's log contribution
# ------------------------------------------------------------------------------------------------


def test_ridge_fit_recovers_weights_at_any_feature_scale():
    """_RidgeFit: a tiny penalty recovers a linear map (R^2 ~ 1) from features at scales 1e-3..1e3; the
    penalty acts on standardised features (rescaling a feature changes no prediction); its R^2 (from
    the running sums) is the directly computed one; data added in chunks fits as in one go; a large
    penalty shrinks the fit."""
    from attn_patch.moh import _RidgeFit

    g = torch.Generator().manual_seed(0)
    n, f, h = 3000, 5, 3
    scale = torch.tensor([1e-3, 1.0, 1e3, 10.0, 1e-2], dtype=torch.float64)
    x = (torch.randn(n, f, generator=g, dtype=torch.float64) + 5.0) * scale  # offset means, very different scales
    w_true = torch.randn(f, h, generator=g, dtype=torch.float64) / scale[:, None]
    b_true = torch.randn(h, generator=g, dtype=torch.float64)
    y = x @ w_true + b_true + 0.01 * torch.randn(n, h, generator=g, dtype=torch.float64)

    def r2_direct(xx, w, b):
        pred = xx @ w.double().T + b.double()
        return float((1 - ((y - pred) ** 2).mean(0) / y.var(0, correction=0)).mean())

    one = _RidgeFit()
    one.add(x.float(), y.float())  # calibrate() adds float32 features
    w, b, r2 = one.solve(1e-6)
    assert w.shape == (h, f) and b.shape == (h,) and w.dtype == torch.float32
    torch.testing.assert_close(w.double() * scale, w_true.T * scale, rtol=0, atol=2e-3)  # per unit of feature
    torch.testing.assert_close(b.double(), b_true, rtol=0, atol=0.05)
    assert r2 > 0.999 and r2 == pytest.approx(r2_direct(x.float().double(), w, b), abs=1e-4)

    chunks = _RidgeFit()
    for part in (slice(0, 1000), slice(1000, 1001), slice(1001, n)):
        chunks.add(x[part].float(), y[part].float())
    for ridge in (1e-6, 1.0):
        (w1, b1, r1), (w2, b2, r2c) = one.solve(ridge), chunks.solve(ridge)
        torch.testing.assert_close(w2, w1, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b2, b1, rtol=1e-5, atol=1e-6)
        assert r2c == pytest.approx(r1, abs=1e-9)

    # standardised penalty: rescaling features by 1e4 / 1e-4 gives the same predictions at any ridge
    rescale = torch.tensor([1e4, 1e-4, 1.0, 1e-4, 1e4], dtype=torch.float64)
    other = _RidgeFit()
    other.add(x * rescale, y)
    fit = _RidgeFit()
    fit.add(x, y)
    for ridge in (1.0, 50.0):
        (wa, ba, ra), (wb, bb, rb) = fit.solve(ridge), other.solve(ridge)
        pa, pb = x @ wa.double().T + ba.double(), (x * rescale) @ wb.double().T + bb.double()
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-4)
        assert rb == pytest.approx(ra, abs=1e-5)
        assert ra == pytest.approx(r2_direct(x, wa, ba), abs=1e-4)  # shrunk fit: the sums' R^2 still exact
    assert fit.solve(50.0)[2] < fit.solve(1.0)[2] < r2
    assert fit.solve(1e3)[2] < 0.5  # the penalty dominates: predictions shrunk towards the mean

    tiny = _RidgeFit()
    tiny.add(x[:1].float(), y[:1].float())
    with pytest.raises(ConfigError, match="two tokens"):
        tiny.solve(0.01)


def test_predict_router_unit_scores_masks_and_straight_through(seed):
    """MoHRouter('predict') on its own: its routing logits are route([hidden, log query norms]) of the
    routed heads (head_order after the shared ones); the mask keeps the shared heads and the top-k of
    those; gates are exactly the mask, and their gradient reaches the route weights, the query and the
    hidden state."""
    h, hidden_size = 6, 16
    with pytest.raises(ConfigError, match="hidden size"):
        MoHRouter("predict", h, 0, 3)
    router = MoHRouter("predict", h, 1, 2, hidden_size=hidden_size)
    assert router.route.weight.shape == (h, hidden_size + h) and router.route.bias.shape == (h,)
    assert not router.fitted and router.route.weight.abs().sum() == 0
    hidden = torch.randn(2, 7, hidden_size, requires_grad=True)
    q = torch.randn(2, h, 7, 8, requires_grad=True)
    router._hidden = hidden
    with pytest.raises(PatchStateError, match="calibrate"):
        router(q)
    with torch.no_grad():
        router.route.weight.normal_()
        router.route.bias.normal_()
    router.fitted = True
    router.head_order.copy_(torch.tensor([4, 0, 5, 2, 1, 3]))  # as calibrate() sets it
    gates, mask, probs = router(q)
    assert torch.equal(gates.detach(), mask.float()), "forward gates are exactly the binary selection"
    feats = torch.cat([hidden.detach(), q.detach().norm(dim=-1).log().transpose(1, 2)], dim=-1)
    pred = feats @ router.route.weight.detach().T + router.route.bias.detach()  # [B, T, H] in head order
    routed = [0, 5, 2, 1, 3]
    torch.testing.assert_close(probs, torch.softmax(pred[..., routed], -1), rtol=1e-5, atol=1e-6)
    picks = torch.tensor(routed)[pred[..., routed].topk(2, dim=-1).indices]
    want = torch.zeros(2, 7, h, dtype=torch.bool).scatter_(-1, picks, True)
    want[..., 4] = True  # the shared head
    assert torch.equal(mask, want)
    (gates * torch.randn_like(gates)).sum().backward()
    for name, grad in (("route", router.route.weight.grad), ("query", q.grad), ("hidden", hidden.grad)):
        assert grad is not None and grad.abs().sum() > 0, f"seed {seed}: no straight-through gradient to {name}"


def test_predict_split_and_config_errors(tmp_path):
    """With only `active`, a predict router shares no heads (shared= still may be given); an
    unfitted predict router refuses to route; routers='untrained' is for learned routers only;
    calibrate() needs two tokens to fit; patching and removing leaves the model as it was."""
    from attn_patch.moh import calibrate

    assert head_split(9, 0.75, None, None, halve=False) == (0, 7)
    assert head_split(9, 0.5, None, None, halve=False) == (0, 5)
    assert head_split(9, 0.75, 2, None, halve=False) == (2, 5)
    assert head_split(9, 0.75, None, None) == (3, 4)  # the other routers still halve
    model = _model("llama", 0)
    ids = torch.randint(1, 90, (1, 12), device=DEVICE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for opts, split in (({"active": 0.5}, (0, 3)), ({"active": 0.75}, (0, 5)), ({}, (0, 5)),
                        ({"active": 0.5, "shared": 1}, (1, 2)), ({"shared": 2, "top_k": 1}, (2, 1))):
        with attn_patch.patched(model, "moh", backend="reference", router="predict", **opts):
            assert [(r.shared, r.top_k) for r in routers_of(model)] == [split] * 2, opts
            assert all(r.kind == "predict" and not r.fitted for r in routers_of(model))
            with pytest.raises(PatchStateError, match="calibrate"), torch.no_grad():
                model(ids)
    with pytest.raises(ConfigError, match="calibrate"):
        attn_patch.apply(model, "moh", router="predict", routers="untrained")
    assert attn_patch.patch_state(model) is None
    with attn_patch.patched(model, "moh", backend="reference", router="predict", active=0.5):
        with pytest.raises(ConfigError, match="two tokens"):
            calibrate(model, [ids[:, :1]])
        calibrate(model, [ids])
        assert all(r.fitted for r in routers_of(model))
        assert any("moh_router.route" in k for k in model.state_dict())
        with torch.no_grad():
            model(ids)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _self_attending_llama(seed):
    """A tiny llama (no GQA) whose heads mostly attend to their own token (keys = queries, scaled up),
    so what a head adds to the residual depends on the token itself and can be predicted from it."""
    from attn_patch.families import attention_modules

    torch.manual_seed(seed)
    model = build("llama", num_key_value_heads=6).to(DEVICE)
    with torch.no_grad():
        for m in attention_modules(model):
            m.q_proj.weight.mul_(8.0)
            m.k_proj.weight.copy_(m.q_proj.weight)
    return model


def _dense_features_and_contributions(model, ids):
    """Per layer, measured on the model as it is (unpatched: every head): the predict router's
    features [B, T, hidden + H] (the attention module's input, log query norms) and the log of each
    head's contribution [B, T, H] (the norm of its output through its slice of the output projection)."""
    from attn_patch.families import attention_modules, head_output_maps, output_projection
    from attn_patch.moh import CONTRIB_FLOOR

    h = model.config.num_attention_heads
    layers, hooks = [], []
    for m in attention_modules(model):
        rec = {}
        layers.append(rec)
        maps = head_output_maps(m, h).detach()

        def pre(_, args, kwargs, rec=rec):
            rec["hidden"] = kwargs.get("hidden_states", args[0] if args else None).detach()

        def qnorm(_, args, out, rec=rec):
            rec["lognorm"] = out.detach().view(*out.shape[:-1], h, -1).norm(dim=-1).log()

        def contrib(_, args, rec=rec, maps=maps):
            x = args[0].detach()
            rec["contrib"] = torch.einsum("bthd,hde->bthe", x.view(*x.shape[:-1], h, -1), maps).norm(dim=-1)

        hooks += [m.register_forward_pre_hook(pre, with_kwargs=True), m.q_proj.register_forward_hook(qnorm),
                  output_projection(m).register_forward_pre_hook(contrib)]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
    return ([torch.cat([r["hidden"], r["lognorm"]], dim=-1) for r in layers],
            [r["contrib"].clamp_min(CONTRIB_FLOOR).log() for r in layers])


def _record_masks(monkeypatch):
    masks = []
    orig = MoHRouter.forward

    def recording(self, query):
        gates, mask, probs = orig(self, query)
        masks.append(mask.detach().clone())
        return gates, mask, probs

    monkeypatch.setattr(MoHRouter, "forward", recording)
    return masks


def test_calibrate_fits_predict_router_to_head_contributions(monkeypatch, seed):
    """calibrate() fits each layer's predict router, by least squares, to the log contributions of
    the heads measured with every head on: fit_r2 is the fit's R^2 on the calibration text (computed
    here independently), close to the unpenalised least-squares one; on held-out text its predictions
    correlate with the measured contributions, and its per-token top-k agrees with the oracle (the
    heads that really contribute most) far more often than chance. Every token keeps exactly k heads,
    none shared."""
    from attn_patch.moh import calibrate

    model = _self_attending_llama(seed)
    k = 3  # of 6 heads
    cal = torch.randint(1, 90, (64, 32), device=DEVICE)
    held = torch.randint(1, 90, (8, 32), device=DEVICE)
    cal_x, cal_y = _dense_features_and_contributions(model, cal)
    held_x, held_y = _dense_features_and_contributions(model, held)
    masks = _record_masks(monkeypatch)
    with attn_patch.patched(model, "moh", backend="reference", router="predict", active=0.5):
        routers = routers_of(model)
        assert [(r.shared, r.top_k) for r in routers] == [(0, k)] * 2
        info = calibrate(model, [cal[:40], cal[40:]], source="test")
        assert info["tokens"] == 64 * 32 and len(info["fit_r2"]) == 2 and not masks  # calibration routes nothing
        assert routers[0].runtime.calibration["fit_r2"] == info["fit_r2"]
        preds = []
        for i, r in enumerate(routers):
            assert r.fitted
            w, b = r.route.weight.detach(), r.route.bias.detach()
            x, y = cal_x[i].flatten(0, 1), cal_y[i].flatten(0, 1)
            r2 = float((1 - ((y - (x @ w.T + b)) ** 2).mean(0) / y.var(0, correction=0)).mean())
            assert info["fit_r2"][i] == pytest.approx(r2, abs=2e-3), (i, info["fit_r2"], r2)
            xd, yd = torch.cat([x, torch.ones_like(x[:, :1])], dim=1).double().cpu(), y.double().cpu()
            best = xd @ torch.linalg.lstsq(xd, yd).solution  # unpenalised least squares
            r2_ls = float((1 - ((yd - best) ** 2).mean(0) / yd.var(0, correction=0)).mean())
            assert r2_ls - 0.05 < r2 <= r2_ls + 1e-6 and r2 > 0.5, (i, r2, r2_ls)
            pred = held_x[i] @ w.T + b
            preds.append(pred)
            corr = torch.corrcoef(torch.stack([pred.flatten(), held_y[i].flatten()]))[0, 1]
            assert corr > 0.7, f"layer {i}, seed {seed}: held-out correlation {float(corr):.3f}"
            picked = torch.zeros_like(pred, dtype=torch.bool).scatter_(-1, pred.topk(k, -1).indices, True)
            oracle = torch.zeros_like(pred, dtype=torch.bool).scatter_(-1, held_y[i].topk(k, -1).indices, True)
            overlap = float((picked & oracle).sum(-1).float().mean())  # chance: k * k / h = 1.5
            same = float((picked == oracle).all(-1).float().mean())  # chance: 1 / C(6, 3) = 0.05
            assert overlap > 2.1 and same > 0.3, f"layer {i}, seed {seed}: overlap {overlap:.3f}, same {same:.3f}"
        model.eval()
        with torch.no_grad():
            model(held)
        st = attn_patch.stats(model)
    assert len(masks) == 2 and all((m.sum(-1) == k).all() for m in masks)
    # layer 0 sees the dense model's input: its heads are the top-k of the router's predictions
    want = torch.zeros_like(masks[0]).scatter_(-1, preds[0].topk(k, -1).indices, True)
    assert float((masks[0] == want).all(-1).float().mean()) > 0.99
    assert st["router"] == "predict" and st["shared"] == 0 and st["top_k"] == k
    for layer in st["layers"]:
        assert layer["shared_heads"] == [] and sum(layer["utilisation"]) == pytest.approx(k, abs=1e-3)
        assert max(layer["utilisation"]) < 1.0  # routed: no head is on for every token


def test_predict_router_gates_and_gradients_in_a_model(monkeypatch, seed):
    """In training mode the predict-routed model's output is the dense model's with the unpicked heads
    zeroed (gates exactly 1 / 0), the LM loss alone gives the route weights a gradient, and the
    straight-through term changes q_proj's gradient; the kernel path equals the reference path;
    routing every head is the dense model."""
    from attn_patch.families import attention_modules, output_projection
    from attn_patch.moh import calibrate

    model = _model("llama", seed, train=True)
    h = model.config.num_attention_heads
    ids = torch.randint(1, 90, (2, 24), device=DEVICE)
    dense, _ = _loss_and_grads(model, ids)
    cal = torch.randint(1, 90, (4, 32), device=DEVICE)
    masks = _record_masks(monkeypatch)
    got = {}
    for backend in ("reference", KERNEL):
        with attn_patch.patched(model, "moh", backend=backend, router="predict", active=0.5):
            calibrate(model, [cal])
            masks.clear()
            got[backend] = _loss_and_grads(model, ids)
            if backend == "reference":
                routed_masks = list(masks)
                orig = MoHRouter.forward

                def no_ste(self, query):
                    gates, mask, probs = orig(self, query)
                    return gates.detach(), mask, probs

                monkeypatch.setattr(MoHRouter, "forward", no_ste)
                _, without = _loss_and_grads(model, ids)
                monkeypatch.setattr(MoHRouter, "forward", orig)
    logits, grads = got["reference"]
    assert len(routed_masks) == 2 and all((m.sum(-1) == 3).all() for m in routed_masks)
    for i in range(2):
        g = grads[f"model.layers.{i}.self_attn.moh_router.route.weight"]
        assert g.abs().max() > 0, f"layer {i}, seed {seed}: the LM loss gives the router no gradient"
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (grads[name] - without[name]).abs().max() > 1e-7
    # the dense model with the same heads zeroed before the output projection
    hooks = []
    for m, mask in zip(attention_modules(model), routed_masks):
        def zero(_, args, mask=mask):
            x = args[0]
            return (x.view(*x.shape[:-1], h, -1) * mask[..., None].to(x.dtype)).view_as(x)

        hooks.append(output_projection(m).register_forward_pre_hook(zero))
    try:
        masked, _ = _loss_and_grads(model, ids)
    finally:
        for hk in hooks:
            hk.remove()
    torch.testing.assert_close(logits, masked, rtol=1e-4, atol=2e-5, msg=f"seed {seed}")
    assert (logits - dense).abs().max() > 1e-3
    kl, kg = got[KERNEL]
    torch.testing.assert_close(kl, logits, rtol=2e-4, atol=2e-5, msg=f"seed {seed}")
    assert kg.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(kg[name], grads[name], rtol=2e-4, atol=3e-5, msg=f"{name}, seed {seed}")
    model.eval()
    with torch.no_grad():
        dense = model(ids).logits
    with attn_patch.patched(model, "moh", backend="reference", router="predict", active=1.0), torch.no_grad():
        calibrate(model, [cal])
        assert [(r.shared, r.top_k) for r in routers_of(model)] == [(0, h)] * 2
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


def test_predict_routers_save_and_load(tmp_path, seed):
    """Saved predict routers load back fitted, with the same weights, head order and logits; options
    that agree with them are accepted, others are errors, and so is a route weight of another shape."""
    import json

    from safetensors.torch import load_file, save_file

    from attn_patch.moh import calibrate, save_routers

    model = _self_attending_llama(seed)
    ids = torch.randint(1, 90, (2, 30), device=DEVICE)
    with attn_patch.patched(model, "moh", backend="reference", router="predict", active=0.5), torch.no_grad():
        info = calibrate(model, [torch.randint(1, 90, (8, 32), device=DEVICE)])
        want = model(ids).logits
        saved = {k: v.clone() for k, v in model.state_dict().items() if "moh_router" in k}
        order = [r.head_order.clone() for r in routers_of(model)]
        save_routers(model, tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "config.json").read_text())
    assert meta["router"]["kind"] == "predict" and meta["router"]["layers"] == [[0, 3]] * 2
    assert meta["calibration"]["fit_r2"] == info["fit_r2"]
    tensors = load_file(str(tmp_path / "r" / "routers.safetensors"))
    assert tensors["layers.1.route.weight"].shape == (6, 96 + 6) and tensors["layers.1.route.bias"].shape == (6,)
    for opts in ({}, {"router": "predict"}, {"active": 0.5}):
        with attn_patch.patched(model, "moh", backend="reference", routers=str(tmp_path / "r"), **opts), \
                torch.no_grad():
            routers = routers_of(model)
            assert all(r.kind == "predict" and r.fitted for r in routers)
            assert all(torch.equal(r.head_order, o) for r, o in zip(routers, order))
            state = model.state_dict()
            assert all(torch.equal(state[k], v) for k, v in saved.items())
            assert torch.equal(model(ids).logits, want)
            assert routers[0].runtime.calibration["fit_r2"] == info["fit_r2"]
    for opts, match in (({"router": "norm"}, "differ"), ({"shared": 1}, "differ"), ({"active": 0.75}, "differ")):
        with pytest.raises(ConfigError, match=match):
            attn_patch.apply(model, "moh", routers=str(tmp_path / "r"), **opts)
    bad = dict(tensors, **{"layers.0.route.weight": tensors["layers.0.route.weight"][:, :96].contiguous()})
    save_file(bad, str(tmp_path / "r" / "routers.safetensors"))
    with pytest.raises(ConfigError, match="shape"):
        attn_patch.apply(model, "moh", routers=str(tmp_path / "r"))
    tensors.pop("layers.0.route.bias")
    save_file(tensors, str(tmp_path / "r" / "routers.safetensors"))
    with pytest.raises(ConfigError, match="missing"):
        attn_patch.apply(model, "moh", routers=str(tmp_path / "r"))
    assert attn_patch.patch_state(model) is None


def test_allocate_with_predict_routes_every_kept_head(tmp_path, monkeypatch, seed):
    """allocate() with predict routers: every kept head is routed (layer split (0, a), or (H, 0) when
    whole), levels start at one head, the mean head count is within `active`; stats agree; per-layer
    predict routers save and load back (same logits); set_layer_heads defaults likewise."""
    import json

    import attn_patch.moh as moh

    torch.manual_seed(seed)
    model = build("llama", num_hidden_layers=3).to(DEVICE)
    h = model.config.num_attention_heads
    ids = torch.randint(1, 90, (2, 40), device=DEVICE)
    with attn_patch.patched(model, "moh", backend="reference", router="predict", active=0.5):
        moh.calibrate(model, [ids])
        got = moh.allocate(model, [ids], active=0.5)
        assert got["top_k"] is None and got["levels"] == list(range(1, h + 1))
        assert sum(got["heads"]) <= int(0.5 * 3 * h + 0.5)
        assert got["mean_active"] == pytest.approx(sum(got["heads"]) / (3 * h), abs=1e-4)
        for r, a in zip(routers_of(model), got["heads"]):
            assert (r.shared, r.top_k) == ((h, 0) if a == h else (0, a))

        cost = [3.0, 1.0, 0.1]  # NLL rise per dropped head in each layer

        def fake_nll(m, batches):
            return sum(c * (h - r.shared - r.top_k) for c, r in zip(cost, routers_of(m)))

        monkeypatch.setattr(moh, "_window_nll", fake_nll)
        got = moh.allocate(model, [ids], active=0.5)
        assert got["heads"] == [6, 2, 1] and got["mean_active"] == pytest.approx(0.5, abs=1e-4)
        assert [(r.shared, r.top_k) for r in routers_of(model)] == [(h, 0), (0, 2), (0, 1)]
        with torch.no_grad():
            want = model(ids).logits
        st = attn_patch.stats(model)
        assert st["heads_per_layer"] == [6, 2, 1] and st["shared"] is None
        assert st["active"] == pytest.approx(0.5, abs=1e-4)
        for layer, a in zip(st["layers"], [6, 2, 1]):
            assert sum(layer["utilisation"]) == pytest.approx(a, abs=1e-3)
            if a == h:  # a whole layer computes every head for every token
                assert layer["utilisation"] == [1.0] * h
        moh.save_routers(model, tmp_path / "r")
        moh.set_layer_heads(model, [3, 6, 1])
        assert [(r.shared, r.top_k) for r in routers_of(model)] == [(0, 3), (h, 0), (0, 1)]
        moh.set_layer_heads(model, [3, 6, 2], top_k=1)
        assert [(r.shared, r.top_k) for r in routers_of(model)] == [(2, 1), (h, 0), (1, 1)]
        with pytest.raises(ConfigError, match="heads with top_k"):
            moh.set_layer_heads(model, [0, 6, 1])
    meta = json.loads((tmp_path / "r" / "config.json").read_text())
    assert meta["router"]["kind"] == "predict" and meta["router"]["layers"] == [[6, 0], [0, 2], [0, 1]]
    assert meta["calibration"]["allocation"]["top_k"] is None
    with attn_patch.patched(model, "moh", backend="reference", routers=str(tmp_path / "r")), torch.no_grad():
        assert [(r.shared, r.top_k) for r in routers_of(model)] == [(h, 0), (0, 2), (0, 1)]
        assert all(r.fitted for r in routers_of(model))
        torch.testing.assert_close(model(ids).logits, want)


def test_predict_router_decodes_and_pads_like_full_forwards(seed):
    """Predict routing is per token (the token's hidden state and queries): decoding on the KV cache
    gives the full forward's logits, and a left-padded row the row's own."""
    from attn_patch.moh import calibrate

    model = _model("qwen2", seed)
    ids = torch.randint(1, 90, (2, 20), device=DEVICE)
    padded, mask = left_padded_batch([19, 11], 19, torch.Generator().manual_seed(seed))
    padded, mask = padded.to(DEVICE), mask.to(DEVICE)
    with attn_patch.patched(model, "moh", backend="reference", router="predict", active=0.5), torch.no_grad():
        calibrate(model, [torch.randint(1, 90, (4, 32), device=DEVICE)])
        full = model(ids).logits
        out = model(ids[:, :14], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(14, 20):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
        batch = model(padded, attention_mask=mask).logits
        alone = model(padded[1:, 8:]).logits
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=2e-4, atol=2e-5, msg=f"seed {seed}")
    torch.testing.assert_close(batch[1, 8:], alone[0], rtol=2e-4, atol=2e-5, msg=f"seed {seed}")
