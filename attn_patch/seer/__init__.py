"""SeerAttention: learned block-sparse prefill attention.

gate.py (the per-layer gate and its input pooling), blocks.py (ground truth and block selection),
weights.py (gate files), method.py (the "seer" method: ``attn_patch.apply(model, "seer")``)."""
from .blocks import (achieved_density, allocate_budget, block_mass_reference, ground_truth_reference, kept_mass_curve,
                     select_blocks, topk_for_density, topk_for_layout)
from .gate import SeerGate, block_causal_mask, pool_blocks, pool_gate_inputs
from .method import SeerConfig, calibrate, distill_losses, gates_of, model_info, save_gates, stats

__all__ = ["SeerGate", "pool_blocks", "pool_gate_inputs", "block_causal_mask", "ground_truth_reference",
           "select_blocks", "topk_for_density", "topk_for_layout", "achieved_density", "SeerConfig", "stats",
           "distill_losses", "save_gates", "gates_of", "model_info", "calibrate", "allocate_budget",
           "block_mass_reference", "kept_mass_curve"]
