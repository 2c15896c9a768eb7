"""The pretraining objective: next-token CE (fp32, masked) + router terms + MTP loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ernie_jax.config import Config
from ernie_jax.model.ernie import ModelOutput, router_loss_total


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-token CE [B,S] in fp32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return lse - picked


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def mtp_loss(mtp_logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Depth d at position t predicts labels[t+d+1]; valid only if t..t+d+1 stay in one document."""
    depth = mtp_logits.shape[0]
    losses = []
    for d in range(depth):  # depth is 1 in the released models; static and tiny
        shift = d + 1
        lab = jnp.pad(labels[:, shift:], ((0, 0), (0, shift)))
        valid = mask
        for j in range(1, shift + 1):
            valid = valid * jnp.pad(mask[:, j:], ((0, 0), (0, j)))
        losses.append(masked_mean(token_cross_entropy(mtp_logits[d], lab), valid))
    return jnp.mean(jnp.stack(losses))


def lm_objective(out: ModelOutput, batch: dict, cfg: Config) -> tuple[jax.Array, dict]:
    """total = LM + sum_layers router loss + lambda_mtp * MTP; returns (total, named scalars)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = token_cross_entropy(out.logits, batch["labels"])
    lm = masked_mean(ce, mask)
    router = router_loss_total(out, cfg)
    metrics = {"lm_loss": lm, "router_loss": router, **out.router_losses, "tokens": jnp.sum(mask)}
    objective = lm
    if cfg.train.token_balanced_loss:
        # ERNIE45_SPEC.md 5.1: the gradient divides the text-token loss sum by the fixed count of all
        # tokens (image and masked ones included), so image-heavy rows are not over-weighted; the
        # value stays the ordinary mean for logging.
        balanced = jnp.sum(ce * mask) / mask.size
        objective = balanced - jax.lax.stop_gradient(balanced) + jax.lax.stop_gradient(lm)
    total = objective + router
    if out.mtp_logits is not None:
        mtp = mtp_loss(out.mtp_logits, batch["labels"], mask)
        metrics["mtp_loss"] = mtp
        total = total + cfg.model.mtp_loss_weight * mtp
    if out.dropped_fraction is not None:
        metrics["dropped_fraction"] = out.dropped_fraction
    metrics["loss"] = total
    return total, metrics


def text_pretraining_task(cfg: Config):
    """Packed text batches from data.source with the LM objective; each process keeps its rows."""
    from ernie_jax.data.text import load_corpus, packed_batches
    from ernie_jax.trainers.loop import Task
    data = load_corpus(cfg.data, cfg.train.seed)
    kw = dict(seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, process_index=jax.process_index(),
              process_count=jax.process_count())
    train_iter = iter(packed_batches(data.train, data.tokenizer, seed=cfg.data.shuffle_seed, **kw))
    eval_batches = None
    if len(data.eval):
        eval_batches = lambda: iter(packed_batches(data.eval, data.tokenizer, seed=1, **kw))  # noqa: E731
    return Task(objective=lm_objective, train_iter=train_iter, eval_batches=eval_batches,
                vocab_size=data.tokenizer.vocab_size,
                description=f"data: {data.stats.summary()}, {len(data.train)} train / {len(data.eval)} eval pieces")


def multimodal_task(cfg: Config, data, encoder=None, description: str = ""):
    """A task over packed multimodal-pipeline batches of `data` (image-text samples, or chats with a
    chat `encoder`) with the LM objective; text targets only."""
    from ernie_jax.data.multimodal import packed_multimodal_batches
    from ernie_jax.trainers.loop import Task
    kw = dict(process_index=jax.process_index(), process_count=jax.process_count(), encoder=encoder)
    train_iter = iter(packed_multimodal_batches(data.train, data.tokenizer, cfg, data.stats,
                                                seed=cfg.data.shuffle_seed, **kw))
    eval_batches = None
    if len(data.eval):
        eval_batches = lambda: iter(packed_multimodal_batches(  # noqa: E731
            data.eval, data.tokenizer, cfg, data.stats, seed=1, repeat=False, **kw))
    return Task(objective=lm_objective, train_iter=train_iter, eval_batches=eval_batches,
                vocab_size=data.tokenizer.vocab_size, stats=data.stats,
                description=description or f"data: {data.stats.summary()}, {len(data.train)} train / "
                                           f"{len(data.eval)} eval samples")


def multimodal_pretraining_task(cfg: Config):
    """Packed image-text batches (data.kind=multimodal)."""
    from ernie_jax.data.multimodal import load_multimodal
    return multimodal_task(cfg, load_multimodal(cfg))


def pretraining_task(cfg: Config):
    """The task `data.kind` asks for."""
    if cfg.data.kind == "chat":
        from ernie_jax.trainers.sft import sft_task
        return sft_task(cfg)
    if cfg.data.kind == "preference":
        from ernie_jax.trainers.dpo import dpo_task
        return dpo_task(cfg)
    return multimodal_pretraining_task(cfg) if cfg.data.kind == "multimodal" else text_pretraining_task(cfg)
