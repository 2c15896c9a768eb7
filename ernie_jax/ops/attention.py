"""One attention function, several backends (`model.attention`):

- `dense`: materialised fp32 logits with an explicit S x T mask; the reference the others are
  tested against, and fine for short sequences.
- `flash`: blockwise pure-JAX attention with a custom VJP (ops/flash_attention.py); any platform,
  memory linear in S, arbitrary token orders (context parallelism).
- `splash`: the TPU Pallas splash-attention kernel with `SegmentIds` and a causal mask.
- `cudnn`: on GPUs, cuDNN's fused attention through `jax.nn.dot_product_attention` for unpacked
  rows, and the Pallas GPU flash kernel (which takes segment ids) for packed rows.
- `auto`: splash on TPU, cudnn on GPU; elsewhere dense up to `AUTO_DENSE_MAX` keys (it is faster
  there and compiles faster: scripts/bench_attention.py), flash beyond.

The mask is always described by vectors: segment ids (a query sees only its own segment; padding
is its own segment, so no row is empty) and, for causal attention, token indices. Indices are
None in the natural order 0..S-1; kernels that cannot take other orders (splash, cudnn) then
hand the call to `flash` and say so once in the log.

Dims: B batch, S query length, T key length, N query heads, K kv heads (GQA: K divides N), D head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from absl import logging

from ernie_jax.errors import ConfigError
from ernie_jax.ops.flash_attention import flash_attention, pad_axis, round_up

BACKENDS = ("auto", "dense", "flash", "cudnn", "splash")
_PLATFORM_OF = {"splash": "tpu", "cudnn": "gpu"}
# (block_q, block_kv) when the config leaves them 0: flash's tiles are sized for CPU caches
# (scripts/bench_attention.py), splash's are MaxText's defaults
DEFAULT_BLOCKS = {"flash": (256, 256), "splash": (512, 512)}
# `auto` off TPU / GPU: at <= 512 keys dense attention is faster than flash on the CPU (2-core
# machine: 21.7 vs 25.1 ms fwd+bwd at S=512, D=64) and its S x T logits are small
AUTO_DENSE_MAX = 512


@dataclass(frozen=True)
class AttentionSpec:
    """Static attention settings: backend, tile sizes (flash and splash), causality, and whether
    Pallas kernels run in interpret mode (any platform, slow: for checking them on a CPU)."""

    backend: str = "auto"
    block_q: int = 512
    block_kv: int = 512
    causal: bool = True
    interpret: bool = False


def platform_name(platform: str) -> str:
    """jax platform names -> tpu | gpu | cpu (cuda and rocm are GPUs)."""
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def resolve_backend(name: str, platform: str, kv_length: int | None = None) -> str:
    """The backend `name` means on `platform` for `kv_length` keys ('auto' -> splash / cudnn, else
    dense for short sequences and flash for long or unknown ones)."""
    if name not in BACKENDS:
        raise ConfigError(f"model.attention={name!r} is not a backend; use one of {', '.join(BACKENDS)}")
    if name == "auto":
        short = kv_length is not None and kv_length <= AUTO_DENSE_MAX
        return {"tpu": "splash", "gpu": "cudnn"}.get(platform_name(platform), "dense" if short else "flash")
    return name


def check_backend(name: str, platform: str, interpret: bool = False) -> str:
    """The resolved backend; ConfigError before any compute when `platform` lacks it."""
    backend = resolve_backend(name, platform)
    need, have = _PLATFORM_OF.get(backend), platform_name(platform)
    if need and need != have and not interpret:
        raise ConfigError(
            f"model.attention={name} needs a {need.upper()} but this run is on {have}; "
            f"use model.attention=flash (or auto)"
        )
    return backend


def resolve(spec: AttentionSpec, platform: str, kv_length: int | None = None) -> tuple[str, AttentionSpec]:
    """(backend, spec with its tile sizes filled in) for `platform`. Traced code calls this: an
    explicit backend is taken as given (the ahead-of-time compile traces TPU code on a CPU host)."""
    backend = resolve_backend(spec.backend, platform, kv_length)
    bq, bk = DEFAULT_BLOCKS.get(backend, (512, 512))
    return backend, dataclasses.replace(
        spec, backend=backend, block_q=spec.block_q or bq, block_kv=spec.block_kv or bk
    )


# splash prefetches its block-sparse mask (2 bytes per q block x kv block) into the TPU core's 1 MiB of
# scalar memory; keep it to half of that (a 1M-token row with 512 blocks needs 8 MiB and fails to compile)
SPLASH_MASK_BYTES = 1 << 19


def splash_mask_fits(q_len: int, kv_len: int, spec: AttentionSpec) -> bool:
    """Whether splash's block mask for a q_len x kv_len row fits its scalar-memory budget."""
    blocks = -(-q_len // spec.block_q) * -(-kv_len // spec.block_kv)
    return 2 * blocks <= SPLASH_MASK_BYTES


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_index: jax.Array | None = None,
    kv_index: jax.Array | None = None,
    spec: AttentionSpec = AttentionSpec(),
) -> jax.Array:
    """q [B,S,N,D], k/v [B,T,K,D]; segment ids [B,S] / [B,T] (None: one segment); token indices
    [B,S] / [B,T] (None: natural order) -> [B,S,N,D]. Softmax statistics are fp32."""
    backend, resolved = resolve(spec, jax.default_backend(), k.shape[1])
    ordered = q_index is None and kv_index is None
    if backend in ("splash", "cudnn") and not ordered:
        _log_once(
            f"attention: {backend} takes tokens in natural order only; reordered tokens (context "
            f"parallelism) use the flash backend"
        )
        backend, resolved = resolve(dataclasses.replace(spec, backend="flash"), jax.default_backend())
    if backend == "splash" and not splash_mask_fits(q.shape[1], k.shape[1], resolved):
        _log_once(
            f"attention: a {q.shape[1]} x {k.shape[1]} row is too long for splash's block mask in the TPU's "
            f"scalar memory (e.g. the ViT's row of every patch of a batch); it uses the flash backend"
        )
        backend, resolved = resolve(dataclasses.replace(spec, backend="flash"), jax.default_backend())
    spec = resolved
    if backend == "splash":
        return splash_attention(q, k, v, q_segment_ids, kv_segment_ids, spec)
    if backend == "cudnn":
        return cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, spec)
    qseg, kseg = _segments(q_segment_ids, q), _segments(kv_segment_ids, k)
    if backend == "dense":
        return dense_attention(q, k, v, qseg, kseg, q_index, kv_index, causal=spec.causal)
    return flash_attention(
        q,
        k,
        v,
        qseg,
        kseg,
        q_index,
        kv_index,
        causal=spec.causal,
        block_q=spec.block_q,
        block_kv=spec.block_kv,
    )


def _segments(ids: jax.Array | None, x: jax.Array) -> jax.Array:
    return jnp.zeros(x.shape[:2], jnp.int32) if ids is None else ids


def dense_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index=None, kv_index=None, *, causal=True):
    """The reference: full [B,K,G,S,T] fp32 logits, mask from the vectors, softmax, weighted sum."""
    b, s, n, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    if q_index is None:
        q_index = jnp.broadcast_to(jnp.arange(s), (b, s))
    if kv_index is None:
        kv_index = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        mask &= q_index[:, :, None] >= kv_index[:, None, :]
    qg = q.reshape(b, s, kvh, n // kvh, d)
    logits = jnp.einsum("bqkgd,btkd->bkgqt", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqt,btkd->bqkgd", probs, v).reshape(b, s, n, d)


def cached_attention(q, k_cache, v_cache, q_slots, first_slot):
    """Decode-step attention over a KV cache: q [B,S,N,D] in cache slots q_slots [S] attends to
    slots first_slot[b] .. its own (left padding before first_slot is never seen); k_cache
    [B,K,T,D], v_cache [B,K,D,T] (kv heads first; values D-major, so p . v contracts their minor
    dim, which XLA:CPU runs as a GEMM, 4x faster than its loop for the other layout). fp32 logits.
    (Reading the cache before this step's write instead, with the new tokens apart, made XLA copy
    the stacked cache in every layer: 25% slower.)"""
    b, s, n, d = q.shape
    kvh, t = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, s, kvh, n // kvh, d)
    logits = jnp.einsum("bskgd,bktd->bkgst", qg, k_cache, preferred_element_type=jnp.float32) * (d**-0.5)
    slots = jnp.arange(t)
    visible = (slots[None, None, :] <= q_slots[None, :, None]) & (
        slots[None, None, :] >= first_slot[:, None, None]
    )
    logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype)
    return jnp.einsum("bkgst,bkdt->bskgd", probs, v_cache).reshape(b, s, n, d)


# ----------------------------------------------------------------------------- TPU: splash


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, spec: AttentionSpec, causal_offset: int = 0):
    """Splash attention (jax.experimental.pallas.ops.tpu.splash_attention): one MQA kernel per kv
    head, vmapped over batch and kv heads, so GQA never repeats K/V. Lengths are padded to the
    tile size with a padding segment. With `spec.causal`, query i sees keys j <= i + causal_offset
    (a chunk of queries that starts `causal_offset` tokens into the keys)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, s, n, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    g = n // kvh
    bq, bk = min(spec.block_q, round_up(s, 128)), min(spec.block_kv, round_up(t, 128))
    sp, tp = round_up(s, bq), round_up(t, bk)
    kernel = _splash_kernel(sp, tp, g, spec.causal, causal_offset, bq, bk, spec.interpret)
    qh = pad_axis(q.reshape(b, s, kvh, g, d).transpose(0, 2, 3, 1, 4) * jnp.asarray(d**-0.5, q.dtype), 3, sp)
    kh = pad_axis(k.transpose(0, 2, 1, 3), 2, tp)
    vh = pad_axis(v.transpose(0, 2, 1, 3), 2, tp)
    qseg = pad_axis(_segments(q_segment_ids, q).astype(jnp.int32), 1, sp, -1)
    kseg = pad_axis(_segments(kv_segment_ids, k).astype(jnp.int32), 1, tp, -1)

    def one(qh, kh, vh, qseg, kseg):  # q [G,S,D], k/v [T,D]
        return kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=qseg, kv=kseg))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_head)(qh, kh, vh, qseg, kseg)  # [B,K,G,S,D]
    return out[:, :, :, :s].transpose(0, 3, 1, 2, 4).reshape(b, s, n, d).astype(q.dtype)


def _splash_kernel(s: int, t: int, heads: int, causal: bool, offset: int, bq: int, bk: int, interpret: bool):
    """An MQA splash kernel for padded lengths s x t. Built inside each trace: its mask tables
    become constants of that trace (splash caches the numpy mask processing itself)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.CausalMask((s, t), offset=offset) if causal else sm.FullMask((s, t))
    blocks = sk.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )
    return sk.make_splash_mqa_single_device(
        sm.MultiHeadMask([mask] * heads), block_sizes=blocks, interpret=interpret
    )


# ----------------------------------------------------------------------------- GPU: cuDNN / Pallas


def cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, spec: AttentionSpec):
    """cuDNN fused attention for unpacked bf16/fp16 rows; packed rows (segment ids) and fp32 go
    through the Pallas GPU flash kernel, which takes segment ids (K/V repeated per query head)."""
    packed = q_segment_ids is not None or kv_segment_ids is not None
    if not packed and q.dtype in (jnp.bfloat16, jnp.float16) and not spec.interpret:
        return jax.nn.dot_product_attention(q, k, v, is_causal=spec.causal, implementation="cudnn")
    why = "packed rows (segment ids)" if packed else f"{q.dtype} inputs"
    _log_once(f"attention: cudnn backend: {why} go through the Pallas GPU flash kernel")
    return pallas_gpu_attention(q, k, v, q_segment_ids, kv_segment_ids, spec)


def pallas_gpu_attention(q, k, v, q_segment_ids, kv_segment_ids, spec: AttentionSpec):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    b, s, n, d = q.shape
    if k.shape[1] != s:
        raise ValueError("the Pallas GPU kernel needs as many keys as queries (self-attention)")
    seg = q_segment_ids if q_segment_ids is not None else kv_segment_ids
    block = min(128, round_up(s, 32))  # a multiple of the 32-row backward tiles
    sp = round_up(s, block)
    g = n // k.shape[2]
    kr, vr = (jnp.repeat(x, g, axis=2) for x in (k, v))
    pad = lambda x: pad_axis(x, 1, sp)
    seg = pad_axis(_segments(seg, q).astype(jnp.int32), 1, sp, -1)
    blocks = gpu_attention.BlockSizes(
        block_q=block, block_k=block, block_q_dkv=32, block_kv_dkv=32, block_q_dq=32, block_kv_dq=32
    )
    out = gpu_attention.mha(
        pad(q),
        pad(kr),
        pad(vr),
        seg,
        sm_scale=d**-0.5,
        causal=spec.causal,
        block_sizes=blocks,
        interpret=spec.interpret,
    )
    return out[:, :s]


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logging.warning(message)
