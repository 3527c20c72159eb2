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
distillation trains against the ground truth of ``ground_truth.py``.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def pool_blocks(x: torch.Tensor, block_size: int, how: str) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, ceil(T / block_size), D]: ``how`` in avg / max / min over each block;
    a partial last block pools over its real tokens only."""
    b, h, t, d = x.shape
    nb = -(-t // block_size)
    pad = nb * block_size - t
    if how == "avg":
        xs = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(b, h, nb, block_size, d).sum(dim=3)
        counts = torch.full((nb,), float(block_size), device=x.device, dtype=xs.dtype)
        counts[-1] = block_size - pad
        return xs / counts[:, None]
    fill = float("-inf") if how == "max" else float("inf")
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad), value=fill).view(b, h, nb, block_size, d)
    if how == "max":
        return xp.amax(dim=3)
    if how == "min":
        return xp.amin(dim=3)
    raise ValueError(f"pooling {how!r}: use avg, max or min")


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
        gate_dim = gate_dim or head_dim
        if not q_proj and gate_dim != head_dim:
            raise ValueError(f"without a query projection the gate dimension is the head dimension ({head_dim}); "
                             f"got gate_dim={gate_dim}: set q_proj=True or drop gate_dim")
        if rope_theta is not None and gate_dim % 2:
            raise ValueError(f"block RoPE needs an even gate dimension, got {gate_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.gate_dim, self.selection, self.rope_theta = block_size, gate_dim, selection, rope_theta
        self.k_proj_per = k_proj_per
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

    def logits(self, q: torch.Tensor, k: torch.Tensor, q_offset: int | None = None) -> torch.Tensor:
        """Block scores before the softmax, block-causal masked with -inf: [B, Hq, NQB, NKB] (fp32).

        ``q`` [B, Hq, Tq, D] and ``k`` [B, Hkv, Tk, D] pre-RoPE; the queries sit at key positions
        ``q_offset ..`` (default Tk - Tq), which must be a multiple of the block size."""
        b, hq, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        bs = self.block_size
        q_offset = tk - tq if q_offset is None else int(q_offset)
        if q_offset % bs:
            raise ValueError(f"the queries start at position {q_offset}, not a multiple of the gate's block "
                             f"size {bs}: chunked prefill must be chunked in whole blocks")
        dtype = self.k_weight.dtype
        qb = pool_blocks(q.to(dtype), bs, "avg")  # [B, Hq, NQB, D]
        kb = torch.cat([pool_blocks(k.to(dtype), bs, how) for how in ("max", "min", "avg")], dim=-1)
        if self.k_proj_per == "head":
            kb = kb.repeat_interleave(hq // hkv, dim=1)  # [B, Hq, NKB, 3D]
        kg = torch.einsum("bhnc,hcg->bhng", kb, self.k_weight)
        qg = torch.einsum("bhnd,hdg->bhng", qb, self.q_weight) if self.q_weight is not None else qb
        if self.rope_theta is not None:
            nqb, nkb = qg.shape[2], kg.shape[2]
            qg = block_rope(qg, torch.arange(nqb, device=q.device) * bs + q_offset, self.rope_theta)
            kg = block_rope(kg, torch.arange(nkb, device=q.device) * bs, self.rope_theta)
        if self.k_proj_per == "group":
            qg = qg.view(b, hkv, hq // hkv, -1, self.gate_dim)
            scores = torch.einsum("bkgnc,bkmc->bkgnm", qg, kg).reshape(b, hq, qg.shape[-2], kg.shape[-2])
        else:
            scores = torch.einsum("bhnc,bhmc->bhnm", qg, kg)
        scores = scores.float() / math.sqrt(self.gate_dim)
        mask = block_causal_mask(scores.shape[-2], scores.shape[-1], q_offset // bs, device=q.device)
        return scores.masked_fill(~mask, float("-inf"))

    def forward(self, q: torch.Tensor, k: torch.Tensor, q_offset: int | None = None) -> torch.Tensor:
        """Block attention probabilities [B, H, NQB, NKB] (H = Hq, or Hkv for group selection)."""
        probs = torch.softmax(self.logits(q, k, q_offset), dim=-1)
        if self.selection == "group":
            b, hq, nq, nk = probs.shape
            probs = probs.view(b, self.num_kv_heads, hq // self.num_kv_heads, nq, nk).mean(dim=2)
        return probs
