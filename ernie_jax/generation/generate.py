"""Batched generation with a KV cache: one jitted program per (batch, prompt length, new tokens):
prefill of the prompts (left-aligned on device, so all rows write the same cache slot each step)
with the model's attention backend, then a `lax.while_loop`
of decode steps that stops when every row has ended; no host round trip per token unless a stream
callback asks for each token."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.errors import ConfigError
from ernie_jax.generation.sampling import next_token
from ernie_jax.model import build_model
from ernie_jax.model.ernie_vl import routing_modality


class Generated(NamedTuple):
    """tokens [B, N] new ids (pad after a row's end), logprobs [B, N] (log p of each token under the
    model, temperature 1; 0 after the end), lengths [B] new tokens per row including its end token."""

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray


def generation_split(model) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of `model` with dropless MoE dispatch (same parameters): capacity limits are
    a training budget and would drop tokens of a decode batch. The dropless structure of a config is
    built once (`_graphdef`) and paired with the model's state, without a merge and a second split
    (~5 ms of every call of a small capacity-dispatch model)."""
    if not model.plan.num_units or model.moe_cfg.dispatch == "dropless":
        return nnx.split(model)
    cfg = model.architecture()
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="dropless"))
    if getattr(model, "lora_config", None) is not None:  # a LoRA model: the same adapters and frozen base
        cfg = dataclasses.replace(cfg, lora=model.lora_config)
    return _graphdef(cfg), nnx.state(model)


@functools.lru_cache(maxsize=8)
def _graphdef(cfg):
    """The model structure of a config, built once (an abstract build costs ~60 ms per generate call)."""
    return nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))))[0]


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to one length (rounded up to `multiple`, so prompts of nearby lengths
    share a compiled program) -> (ids [B, P], lengths [B])."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(-(-max(lengths) // multiple) * multiple)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    return ids, lengths


def check_request(max_new_tokens: int, temperature: float, top_p: float, top_k: int, lengths, limit: int):
    """One line per bad argument, before anything compiles."""
    if max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] (1 = no nucleus truncation)")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k} must be >= 0 (0 = no top-k truncation)")
    if len(lengths) == 0 or int(np.min(lengths)) < 1:
        raise ConfigError("the prompt is empty: give at least one token per prompt")
    longest = int(np.max(lengths))
    if longest + max_new_tokens > limit:
        raise ConfigError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"{limit} positions (model.max_position_embeddings); shorten the prompt or ask for fewer tokens"
        )


def generate(
    model,
    input_ids,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    eos_token_ids: Sequence[int] | None = None,
    prompt_lengths=None,
    stream: Callable[[int, np.ndarray], None] | None = None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    patch_budget: int | None = None,
    unroll_layers: bool | None = None,
) -> Generated:
    """Continue prompts with `model` (ErnieForCausalLM, or ErnieVLForConditionalGeneration with
    images / videos as in its transformers-style call: patches [sum(t*h*w), C*P*P] and grids [n, 3],
    in the order their placeholders appear, row by row; new tokens continue the 3D positions after
    the largest position of each prompt).

    input_ids [B, P] right-padded (or a list of token lists); prompt_lengths [B] (default: all P);
    temperature 0 is greedy; top_k 0 and top_p 1 switch truncation off; eos_token_ids end a row
    (default: the model's eos). `stream(step, tokens [B])` is called on the host as each step's
    tokens are chosen (rows that have ended get the pad id). The same seed gives the same samples.
    `patch_budget` (VL) pads the patches to that many, so batches of other images share one program.
    `unroll_layers`: run the layers one by one, each with its own weight and cache buffers, instead
    of scanning the stacks (default: on CPU only, see `_unrolls_by_default`)."""
    m = model.model_cfg
    if not isinstance(input_ids, (np.ndarray, jax.Array)):
        input_ids, prompt_lengths = pad_prompts(input_ids, m.pad_token_id)
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2:
        raise ConfigError(f"input_ids must be [batch, length], got shape {ids.shape}")
    lengths = (
        np.full(ids.shape[0], ids.shape[1], np.int32)
        if prompt_lengths is None
        else np.asarray(prompt_lengths, np.int32)
    )
    check_request(max_new_tokens, temperature, top_p, top_k, lengths, m.max_position_embeddings)
    if int(np.max(lengths)) > ids.shape[1]:
        raise ConfigError(f"prompt_lengths {lengths.tolist()} exceed the {ids.shape[1]} columns of input_ids")
    eos = np.asarray(sorted(set(eos_token_ids or [m.eos_token_id])), np.int32)
    graphdef, state = generation_split(model)
    real = np.arange(ids.shape[1])[None] < lengths[:, None]
    pixels = [x for x in (pixel_values, pixel_values_videos) if x is not None]
    if hasattr(model, "vision_model"):
        positions, patches, layout = model.prompt_inputs(
            ids,
            pixel_values,
            image_grid_thw,
            None,
            None,
            pixel_values_videos,
            video_grid_thw,
            real.astype(np.int32),
            patch_budget=patch_budget,
        )
        positions = np.where(real[..., None], positions, 0)
        next_position = positions.max(axis=(1, 2)) + 1
        embeds = _vl_embeds(graphdef, state, jnp.asarray(ids), patches, layout)
        modality = routing_modality(jnp.asarray(ids), model.vision_cfg)
    else:
        if pixels:
            raise ConfigError(
                "pixel_values / videos need a VL checkpoint (vision.enabled); this is a text model"
            )
        positions = np.where(real, np.arange(ids.shape[1])[None], 0)
        next_position, embeds, modality = lengths, None, None
    tokens, logps, n = _generate(
        graphdef,
        state,
        jnp.asarray(ids),
        jnp.asarray(lengths),
        jnp.asarray(positions, jnp.int32),
        jnp.asarray(next_position, jnp.int32),
        embeds,
        modality,
        jnp.asarray(eos),
        jax.random.key(seed),
        jnp.float32(temperature),
        jnp.float32(top_p),
        max_new=max_new_tokens,
        top_k=top_k,
        greedy=temperature == 0,
        nucleus=top_p < 1,
        pad_id=m.pad_token_id,
        stream=stream,
        unroll=_unrolls_by_default() if unroll_layers is None else bool(unroll_layers),
    )
    return Generated(np.asarray(tokens), np.asarray(logps), np.asarray(n))


def _unrolls_by_default() -> bool:
    """Whether decode runs the layers one by one. XLA:CPU hands a matmul only whole buffers, so a
    scanned layer's weights and cache are copied out of their stacks at every layer of every step
    (~45% of a batch-8 step of the default MoE); per-layer buffers avoid that (same tokens, ~1.5x
    faster) at a compile time that grows with depth and a second copy of the decoder weights for the
    length of the call. GPU and TPU read a slice of a stack in place, so there the stacks stay
    scanned (compile time independent of depth)."""
    return jax.default_backend() == "cpu"


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new", "top_k", "greedy", "nucleus", "pad_id", "stream", "unroll"),
)
def _generate(
    graphdef,
    state,
    ids,
    lengths,
    positions,
    next_position,
    embeds,
    modality,
    eos,
    key,
    temperature,
    top_p,
    *,
    max_new,
    top_k,
    greedy,
    nucleus,
    pad_id,
    stream,
    unroll,
):
    """ids, positions ([B,P] or [B,P,3]), embeds [B,P,H] / modality [B,P] (VL; else None) are
    right-padded to P; next_position [B]: the position of each row's first new token."""
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    # left-align the prompts: every row's next token then goes into the same cache slot
    pad = p - lengths
    slots = jnp.arange(p, dtype=jnp.int32)
    order = (slots[None] - pad[:, None]) % p
    left = lambda a: (
        None
        if a is None
        else jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
    )
    ids, positions, embeds, modality = left(ids), left(positions), left(embeds), left(modality)
    real = slots[None] >= pad[:, None]
    cache = model.init_cache(b, p + max_new)
    table_t = model.head_table_t()  # once, not per token
    hidden, cache = model.extend(
        ids,
        positions,
        cache,
        jnp.int32(0),
        pad,
        prefill=True,
        segment_ids=real.astype(jnp.int32),
        inputs_embeds=embeds,
        modality=modality,
    )
    layers_def = layers_state = None
    if unroll and max_new > 1:  # each layer's weights and cache as their own buffers, sliced once
        layers_def, layers_state = nnx.split(nnx.List(model.decoder_layers()))
        cache = model.layer_caches(cache)
    key, sub = jax.random.split(key)
    token, logp = next_token(model.head(hidden[:, -1]), sub, temperature, top_k, top_p, greedy, nucleus)
    if stream is not None:
        jax.experimental.io_callback(stream, None, 0, token, ordered=True)
    tokens = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(token)
    logps = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(logp)
    done = jnp.isin(token, eos)
    ended_at = jnp.where(done, 1, max_new)

    def cond(c: _Decoding):
        return (c.t < max_new) & ~jnp.all(c.done)

    def body(c: _Decoding):
        t, tokens, logps, cache, key, ended_at, done, prev, state, layers_state = c
        model = nnx.merge(graphdef, state)  # the weights ride in the carry: nnx modules stay in one trace
        layers = None if layers_def is None else list(nnx.merge(layers_def, layers_state))
        slot = p + t - 1  # the previous token's slot (the same in every row)
        position = (next_position + t - 1)[:, None]
        if positions.ndim == 3:  # 3D RoPE: a text token has t = h = w
            position = jnp.broadcast_to(position[..., None], (b, 1, 3))
        # VL: a new start / end marker routes to the vision experts, as it would in a re-run
        step_modality = None if modality is None else routing_modality(prev[:, None], model.vision_cfg)
        hidden, cache = model.extend(
            prev[:, None], position, cache, slot, pad, prefill=False, modality=step_modality, layers=layers
        )
        key, sub = jax.random.split(key)
        logits = model.head(hidden[:, 0], table_t)
        token, logp = next_token(logits, sub, temperature, top_k, top_p, greedy, nucleus)
        token = jnp.where(done, pad_id, token)
        logp = jnp.where(done, 0.0, logp)
        if stream is not None:
            jax.experimental.io_callback(stream, None, t, token, ordered=True)
        ends = ~done & jnp.isin(token, eos)
        ended_at = jnp.where(ends, t + 1, ended_at)
        tokens = tokens.at[:, t].set(token)
        logps = logps.at[:, t].set(logp)
        return _Decoding(t + 1, tokens, logps, cache, key, ended_at, done | ends, token, state, layers_state)

    start = _Decoding(jnp.int32(1), tokens, logps, cache, key, ended_at, done, token, state, layers_state)
    end = jax.lax.while_loop(cond, body, start)
    return end.tokens, end.logps, end.ended_at


class _Decoding(NamedTuple):
    """The decode loop's carry: step t (the next token's index), the outputs so far, the cache, the
    previous tokens and the weights (the model's state; each layer's own with unrolled layers)."""

    t: jax.Array
    tokens: jax.Array
    logps: jax.Array
    cache: dict | list
    key: jax.Array
    ended_at: jax.Array
    done: jax.Array
    prev: jax.Array
    state: nnx.State
    layers_state: nnx.State | None


@functools.partial(jax.jit, static_argnums=0)
def _vl_embeds(graphdef, state, ids, patches, layout):
    return nnx.merge(graphdef, state).embed(ids, patches, layout)
