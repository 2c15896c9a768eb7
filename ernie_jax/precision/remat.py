"""Recomputation policies by name (`model.remat`), built on jax.checkpoint_policies.

Activations are tagged with `checkpoint_name` where they are produced: `qkv` (q, k, v after RoPE),
`attn_out` (attention output before o_proj), `moe_dispatch` (expert input buffers),
`expert_out` (expert outputs), `mlp_out` (dense FFN output). `named` saves exactly
`model.remat_names` (or offloads them to host memory with `model.remat_offload`).
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name  # noqa: F401  (re-exported for the model)

CHECKPOINT_NAMES = ("qkv", "attn_out", "moe_dispatch", "expert_out", "mlp_out")
cp = jax.checkpoint_policies


def remat_policy(name: str, names: tuple[str, ...] = (), offload: bool = False):
    """The policy for a `model.remat` value; None means: save nothing (full recomputation)."""
    if name == "full":
        return None
    if name == "dots_saveable":
        return cp.dots_saveable
    if name == "save_attention_out":
        return cp.save_only_these_names("attn_out")
    if name == "save_qkv_recompute_mlp":
        return cp.save_only_these_names("qkv", "attn_out")
    if name == "named":
        if offload:
            return cp.save_and_offload_only_these_names(
                names_which_can_be_saved=[],
                names_which_can_be_offloaded=list(names),
                offload_src="device",
                offload_dst="pinned_host",
            )
        return cp.save_only_these_names(*names)
    raise ValueError(f"unknown remat policy {name}")
