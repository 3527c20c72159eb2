"""SeerAttention: learned block-sparse prefill attention (issue 4). This package holds the gate
(gate.py) and the block-level ground truth and selection (blocks.py); the method that patches a
model with them is registered once its kernel path is complete."""
from .blocks import achieved_density, ground_truth_reference, select_blocks, topk_for_density
from .gate import SeerGate, block_causal_mask, pool_blocks

__all__ = ["SeerGate", "pool_blocks", "block_causal_mask", "ground_truth_reference", "select_blocks",
           "topk_for_density", "achieved_density"]
