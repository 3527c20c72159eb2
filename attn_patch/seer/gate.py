"""SeerAttention's attention gate: which key blocks each query block should attend to.

Per layer, from the attention's query and key *before* RoPE:
- pool along the sequence in blocks of ``block_size`` tokens (the last block may be partial):
  queries by average, keys by max, min and average concatenated (3 * head_dim channels);
- project per head: keys always (one weight per query head, or per KV head), queries optionally
  (without a query projection the gate dimension is the head dimension);
- re-apply RoPE to the projected, pooled queries and keys, each block at its first token's position
  (skipped for families without rotary embeddings);
- score query blocks against key blocks, scaled by 1 / sqrt(gate_dim), with a block-causal mask,
  and softmax over key blocks.

The result, [B, H, n_q_blocks, n_k_blocks] with H the query heads ("head" selection) or the KV
heads ("group" selection, the group's heads averaged), is what the block selection reads and what
distillation trains against the ground truth of ``blocks.py``.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def pool_blocks(x: torch.Tensor, block_size: int, how: str, lead: int = 0,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, NB, D]: ``how`` in avg / max / min over each block of ``block_size``
    rows. ``lead`` rows before the first row belong to the first block without being there (a chunk
    that starts inside a block); ``valid`` [B, T] (False = padding) drops rows. Partial blocks pool
    over their real rows only; a block with none gives 0."""
    b, h, t, d = x.shape
    nb = -(-(t + lead) // block_size)
    pad = nb * block_size - t - lead
    keep = torch.ones(b, t, dtype=torch.bool, device=x.device) if valid is None else valid.bool()
    keep = torch.nn.functional.pad(keep, (lead, pad)).view(b, 1, nb, block_size, 1)
    xp = torch.nn.functional.pad(x, (0, 0, lead, pad)).view(b, h, nb, block_size, d)
    if how == "avg":
        total = torch.where(keep, xp, 0).sum(dim=3)
        return total / keep.sum(dim=3).clamp(min=1).to(total.dtype)
    if how not in ("max", "min"):
        raise ValueError(f"pooling {how!r}: use avg, max or min")
    fill = float("-inf") if how == "max" else float("inf")
    pooled = torch.where(keep, xp, fill)
    pooled = pooled.amax(dim=3) if how == "max" else pooled.amin(dim=3)
    return torch.where(keep.any(dim=3), pooled, 0)


def unrope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo rotate-half RoPE: ``x`` [B, H, T, D] as the model attends (after RoPE), ``cos``/``sin``
    [B|1, T, R] as the model's rotary embedding gave them (R <= D: partial rotary rotates the first
    R channels). Exact for any per-position scale folded into cos/sin (YaRN's attention factor)."""
    r = cos.shape[-1]
    c, s = cos[:, None].float(), sin[:, None].float()
    xr = x[..., :r].float()
    pre = (xr * c - rotate_half(xr) * s) / (c * c + s * s)
    return torch.cat([pre, x[..., r:].float()], dim=-1) if r < x.shape[-1] else pre


def pool_gate_inputs(q: torch.Tensor, k: torch.Tensor, block_size: int, q_offset: int,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                     key_padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's inputs in plain PyTorch: (pooled queries [B, Hq, NQB, D], pooled keys
    [B, Hkv, NKB, 3D] as max | min | avg), fp32. ``q``/``k`` are taken before RoPE, or after it with
    ``cos``/``sin`` for every key position (the queries use the last Tq of them). Query blocks are
    aligned to the key blocks: a chunk starting inside a block gets a partial first block."""
    tq, tk = q.shape[2], k.shape[2]
    if cos is not None:
        q = unrope(q, cos[:, tk - tq:], sin[:, tk - tq:])
        k = unrope(k, cos, sin)
    q, k = q.float(), k.float()
    lead = q_offset % block_size
    qb = pool_blocks(q, block_size, "avg", lead=lead)
    kb = torch.cat([pool_blocks(k, block_size, how, valid=key_padding) for how in ("max", "min", "avg")], dim=-1)
    return qb, kb


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def block_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Standard (rotate-half) RoPE on [B, H, NB, G] at integer ``positions`` [NB]."""
    g = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, g, 2, device=x.device, dtype=torch.float32) / g))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    return x * cos + rotate_half(x) * sin


def block_causal_mask(n_q: int, n_k: int, q_block_offset: int | None = None, device=None) -> torch.Tensor:
    """Bool [n_q, n_k]: query block i (at key block ``i + q_block_offset``) sees key blocks <= it."""
    if q_block_offset is None:
        q_block_offset = n_k - n_q
    qi = torch.arange(n_q, device=device)[:, None] + q_block_offset
    kj = torch.arange(n_k, device=device)[None, :]
    return kj <= qi


class SeerGate(nn.Module):
    """The gate of one attention layer. ``selection``: "head" scores per query head, "group" one
    score map per KV head (its query heads' probabilities averaged)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *, block_size: int = 64,
                 gate_dim: int | None = None, q_proj: bool = False, k_proj_per: str = "head",
                 selection: str = "head", rope_theta: float | None = 10000.0):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        if k_proj_per not in ("head", "group"):
            raise ValueError(f"k_proj_per must be 'head' or 'group', got {k_proj_per!r}")
        if selection not in ("head", "group"):
            raise ValueError(f"selection must be 'head' or 'group', got {selection!r}")
        gate_dim = head_dim if gate_dim is None else gate_dim
        if gate_dim < 1:
            raise ValueError(f"gate_dim must be a positive number of channels, got {gate_dim}")
        if not q_proj and gate_dim != head_dim:
            raise ValueError(f"without a query projection the gate dimension is the head dimension ({head_dim}); "
                             f"got gate_dim={gate_dim}: set q_proj=True or drop gate_dim")
        if rope_theta is not None and gate_dim % 2:
            raise ValueError(f"block RoPE needs an even gate dimension, got {gate_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.gate_dim, self.selection, self.rope_theta = block_size, gate_dim, selection, rope_theta
        self.k_proj_per = k_proj_per
        self.budget: tuple[float, ...] | None = None  # per-unit densities of allocation="calibrated" (set by apply)
        n_k = num_heads if k_proj_per == "head" else num_kv_heads
        # per-head projections as batched weights [heads, in, out] (one einsum, no Python loop)
        self.k_weight = nn.Parameter(torch.empty(n_k, 3 * head_dim, gate_dim))
        self.q_weight = nn.Parameter(torch.empty(num_heads, head_dim, gate_dim)) if q_proj else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # a start near "pooled q . average-pooled k": the K map passes the average channels through
        # (plus small noise on the rest), the Q map is near the identity
        with torch.no_grad():
            d, g = self.head_dim, self.gate_dim
            self.k_weight.normal_(0.0, 0.02 / math.sqrt(3 * d))
            eye = torch.eye(d, g)
            self.k_weight[:, 2 * d:, :] += eye
            if self.q_weight is not None:
                self.q_weight.copy_(eye.expand_as(self.q_weight) + 0.02 / math.sqrt(d) * torch.randn_like(self.q_weight))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"block_size={self.block_size}, gate_dim={self.gate_dim}, q_proj={self.q_weight is not None}, "
                f"k_proj_per={self.k_proj_per}, selection={self.selection}, rope_theta={self.rope_theta}")

    def logits(self, q: torch.Tensor, k: torch.Tensor, q_offset: int | None = None,
               cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
               key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """Block scores before the softmax, block-causal masked with -inf: [B, Hq, NQB, NKB] (fp32).

        ``q`` [B, Hq, Tq, D] and ``k`` [B, Hkv, Tk, D] before RoPE (or after it, with the model's
        ``cos``/``sin`` for all Tk positions); the queries sit at key positions ``q_offset ..``
        (default Tk - Tq). Query blocks are aligned to key blocks, so a chunk that starts inside a
        block has a partial first query block."""
        tq, tk = q.shape[2], k.shape[2]
        q_offset = tk - tq if q_offset is None else int(q_offset)
        qb, kb = pool_gate_inputs(q, k, self.block_size, q_offset, cos, sin, key_padding)
        return self.score(qb, kb, q_offset // self.block_size)

    def projected(self, qb: torch.Tensor, kb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's queries [B, Hq, NQB, G] and keys [B, Hq | Hkv, NKB, G] (per query head, or per
        KV head with ``k_proj_per="group"``) from pooled inputs, before block RoPE, in the gate's dtype."""
        b, hq, nqb, _ = qb.shape
        hkv, nkb = kb.shape[1], kb.shape[2]
        if hq != self.num_heads or hkv != self.num_kv_heads:
            raise ValueError(f"gate built for {self.num_heads} query / {self.num_kv_heads} KV heads got "
                             f"{hq} / {hkv}")
        dtype = self.k_weight.dtype
        qb, kb = qb.to(dtype), kb.to(dtype)
        if self.k_proj_per == "head":
            kb = kb.repeat_interleave(hq // hkv, dim=1)  # [B, Hq, NKB, 3D]
        kg = torch.einsum("bhnc,hcg->bhng", kb, self.k_weight)
        qg = torch.einsum("bhnd,hdg->bhng", qb, self.q_weight) if self.q_weight is not None else qb
        # under autocast the projections come out in bf16/fp16 while an unprojected qg keeps the gate's
        # dtype: give both the gate's dtype, as documented (the fused scores need one dtype)
        return qg.to(dtype), kg.to(dtype)

    def raw_scores(self, qb: torch.Tensor, kb: torch.Tensor, q_block_offset: int, fused: bool = False) -> torch.Tensor:
        """Unscaled block scores [B, Hq, NQB, NKB] from pooled inputs (their order per row is what
        top-k selection needs). ``fused``: block RoPE and the dot products in one Triton launch
        (inference; no gradient), which leaves the entries above the block diagonal unset."""
        b, hq, nqb, _ = qb.shape
        nkb = kb.shape[2]
        qg, kg = self.projected(qb, kb)
        bs = self.block_size
        if fused and self.gate_dim % 2 == 0:  # the kernel rotates channel halves
            from ..kernels.seer_select import block_scores

            return block_scores(qg, kg, block_size=bs, rope_theta=self.rope_theta, q_block_offset=q_block_offset)
        if self.rope_theta is not None:
            qg = block_rope(qg, (torch.arange(nqb, device=qb.device) + q_block_offset) * bs, self.rope_theta)
            kg = block_rope(kg, torch.arange(nkb, device=qb.device) * bs, self.rope_theta)
        if self.k_proj_per == "group":
            hkv = kg.shape[1]
            qg = qg.view(b, hkv, hq // hkv, nqb, self.gate_dim)
            return torch.einsum("bkgnc,bkmc->bkgnm", qg, kg).reshape(b, hq, nqb, nkb)
        return torch.einsum("bhnc,bhmc->bhnm", qg, kg)

    def score(self, qb: torch.Tensor, kb: torch.Tensor, q_block_offset: int, fused: bool = False) -> torch.Tensor:
        """Logits from pooled inputs (``pool_gate_inputs`` or the fused pooling kernel): query block i
        sits at key block ``q_block_offset + i``. [B, Hq, NQB, NKB] fp32, -inf where not visible.
        ``fused`` as in ``raw_scores``."""
        scores = self.raw_scores(qb, kb, q_block_offset, fused).float() / math.sqrt(self.gate_dim)
        mask = block_causal_mask(scores.shape[-2], scores.shape[-1], q_block_offset, device=qb.device)
        return scores.masked_fill(~mask, float("-inf"))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over key blocks; for "group" selection the group's heads averaged: [B, H, NQB, NKB]."""
        probs = torch.softmax(logits, dim=-1)
        if self.selection == "group":
            b, hq, nq, nk = probs.shape
            probs = probs.view(b, self.num_kv_heads, hq // self.num_kv_heads, nq, nk).mean(dim=2)
        return probs

    def forward(self, q: torch.Tensor, k: torch.Tensor, q_offset: int | None = None, **rope) -> torch.Tensor:
        """Block attention probabilities [B, H, NQB, NKB] (H = Hq, or Hkv for group selection)."""
        return self.probs(self.logits(q, k, q_offset, **rope))
