"""The language-modelling objective every LM trainer shares: next-token CE (fp32, masked) + router
terms + MTP loss, and the task over packed multimodal-pipeline batches that pretraining (image-text)
and SFT (chats) both train with it; only their loss masks differ."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ernie_jax.config import Config
from ernie_jax.data.multimodal import check_eval_batches, packed_multimodal_batches
from ernie_jax.model.ernie import ModelOutput, router_loss_total
from ernie_jax.ops.cross_entropy import token_cross_entropy
from ernie_jax.trainers.task import Task


def token_nll(out: ModelOutput, labels: jax.Array) -> jax.Array:
    """Per-token CE [B,S] of `labels`: the model's chunked-head losses when it was called with the
    labels (the training path), else from its logits."""
    return out.label_nll if out.label_nll is not None else token_cross_entropy(out.logits, labels)


def mtp_token_nll(out: ModelOutput, labels: jax.Array) -> jax.Array | None:
    """[D,B,S]: MTP depth d at position t scored on labels[t+d+1]; None without MTP heads."""
    if out.mtp_label_nll is not None:
        return out.mtp_label_nll
    if out.mtp_logits is None:
        return None
    s = labels.shape[1]
    depth = out.mtp_logits.shape[0]
    padded = jnp.pad(labels, ((0, 0), (0, depth)))
    return jnp.stack(
        [token_cross_entropy(out.mtp_logits[d], padded[:, d + 1 : d + 1 + s]) for d in range(depth)]
    )


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def mtp_loss(mtp_nll: jax.Array, mask: jax.Array) -> jax.Array:
    """mtp_nll [D,B,S] (depth d at position t scored on labels[t+d+1]); a position counts only if
    t..t+d+1 stay in one document."""
    losses = []
    for d in range(mtp_nll.shape[0]):  # depth is 1 in the released models; static and tiny
        valid = mask
        for j in range(1, d + 2):
            valid = valid * jnp.pad(mask[:, j:], ((0, 0), (0, j)))
        losses.append(masked_mean(mtp_nll[d], valid))
    return jnp.mean(jnp.stack(losses))


def lm_objective(out: ModelOutput, batch: dict, cfg: Config) -> tuple[jax.Array, dict]:
    """total = LM + sum_layers router loss + lambda_mtp * MTP; returns (total, named scalars)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = token_nll(out, batch["labels"])
    lm = masked_mean(ce, mask)
    router = router_loss_total(out, cfg.moe)
    metrics = {"lm_loss": lm, "router_loss": router, **out.router_losses, "tokens": jnp.sum(mask)}
    objective = lm
    if cfg.train.token_balanced_loss:
        # PaddlePaddle/ERNIE ernie/modeling_moe_vl.py: the gradient divides the text-token loss sum by
        # the fixed count of all
        # tokens (image and masked ones included), so image-heavy rows are not over-weighted; the
        # value stays the ordinary mean for logging.
        balanced = jnp.sum(ce * mask) / mask.size
        objective = balanced - jax.lax.stop_gradient(balanced) + jax.lax.stop_gradient(lm)
    total = objective + router
    mtp_nll = mtp_token_nll(out, batch["labels"])
    if mtp_nll is not None:
        mtp = mtp_loss(mtp_nll, mask)
        metrics["mtp_loss"] = mtp
        total = total + cfg.model.mtp_loss_weight * mtp
    if out.dropped_fraction is not None:
        metrics["dropped_fraction"] = out.dropped_fraction
    metrics["loss"] = total
    return total, metrics


def multimodal_lm_task(cfg: Config, data, encoder=None, description: str = ""):
    """A task over packed multimodal-pipeline batches of `data` (image-text samples, or chats with a
    chat `encoder`) with the LM objective; text targets only."""
    kw = dict(process_index=jax.process_index(), process_count=jax.process_count(), encoder=encoder)
    train_iter = iter(
        packed_multimodal_batches(
            data.train, data.tokenizer, cfg, data.stats, seed=cfg.data.shuffle_seed, **kw
        )
    )
    eval_batches = None
    if len(data.eval):
        eval_data = packed_multimodal_batches(
            data.eval, data.tokenizer, cfg, data.stats, seed=1, repeat=False, split="eval", **kw
        )
        check_eval_batches(eval_data, len(data.eval), cfg, data.stats)
        eval_batches = lambda: iter(eval_data)
    return Task(
        objective=lm_objective,
        train_iter=train_iter,
        eval_batches=eval_batches,
        vocab_size=data.tokenizer.vocab_size,
        stats=data.stats,
        tokenizer=data.tokenizer,
        description=description
        or f"data: {data.stats.summary()}, {len(data.train)} train / {len(data.eval)} eval samples",
    )
