"""Router training terms as pure functions (PaddlePaddle/ERNIE ernie/moe/topk_gate.py, moe_layer.py).

Shapes: T tokens, E experts, K top-k, H hidden. Router kernels are stored [H, E].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def aux_balance_loss(probs: jax.Array, topk_idx: jax.Array, mask: jax.Array) -> jax.Array:
    """ERNIE load-balance loss E * sum_e me_e * ce_e.

    probs [T,E] softmax, topk_idx [T,K] chosen WITHOUT the correction bias, mask [T] (1 = real
    token of this modality). me = mean router prob, ce = assignment count / tokens (detached).
    """
    num_experts = probs.shape[-1]
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    me = (probs * mask[:, None]).sum(0) / n
    counts = (jax.nn.one_hot(topk_idx, num_experts, dtype=jnp.float32) * mask[:, None, None]).sum((0, 1))
    ce = jax.lax.stop_gradient(counts / n)
    return num_experts * jnp.sum(me * ce)


def z_loss(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Router z-loss: mean over real tokens of logsumexp(logits)^2."""
    mask = mask.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(lse * lse * mask) / jnp.maximum(mask.sum(), 1.0)


def orthogonal_loss(kernel: jax.Array, groups: int = 1) -> jax.Array:
    """||W_hat W_hat^T - I||_F^2 / (g * (E/g)^2) with rows of W [E,H] L2-normalised.

    kernel [H, E]. groups > 1 splits experts into `groups` contiguous groups and only asks
    experts within a group to be orthogonal (ERNIE's moe_group_orthogonal_loss, groups = top-k).
    """
    w = kernel.astype(jnp.float32).T
    w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
    e = w.shape[0]
    w = w.reshape(groups, e // groups, -1)
    gram = jnp.einsum("gih,gjh->gij", w, w)
    eye = jnp.eye(e // groups, dtype=jnp.float32)
    return jnp.sum((gram - eye) ** 2) / (groups * (e // groups) ** 2)


def orthogonal_update(kernel: jax.Array, rate: float, groups: int = 1) -> jax.Array:
    """Decoupled orthogonal step applied after the optimizer: W <- W - rate * dL_orth/dW.

    Works on one kernel [H, E] or a stack [..., H, E].
    """
    step = jax.grad(lambda w: orthogonal_loss(w, groups))
    for _ in range(kernel.ndim - 2):
        step = jax.vmap(step)
    return (kernel.astype(jnp.float32) - rate * step(kernel)).astype(kernel.dtype)


def correction_bias_update(bias: jax.Array, usage: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing: b += rate * sign(mean_e usage - usage) (last axis = experts).

    bias and usage [..., E]; usage = tokens dispatched to each expert over the global step.
    """
    usage = usage.astype(jnp.float32)
    return bias + rate * jnp.sign(usage.mean(-1, keepdims=True) - usage)
