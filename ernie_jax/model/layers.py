"""Basic layers: RMSNorm, Linear with an injectable dot_general (the FP8 hook), Embed, SwiGLU MLP.

Params live in `param_dtype` (fp32 master copy); math runs in `dtype` (bf16 for training, fp32
for parity). Every Param carries logical axis names in its `axes` metadata for the sharding rules.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.ops import matmul
from ernie_jax.precision.fp8 import DelayedFp8, Fp8Meta

DotGeneral = Callable[..., jax.Array]


def normal_init(std: float):
    return jax.nn.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
    """y = w * x * rsqrt(mean(x^2) + eps), computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Standard LayerNorm with scale and bias (the ViT and the adapter), fp32 statistics."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ W (+ b) with W [in, out]; the text model has no biases, the ViT/adapter do.
    `dot_general` is replaceable (FP8, quantised matmuls)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        axes: tuple[str, str],
        rngs: nnx.Rngs,
        std: float,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        dot_general: DotGeneral = matmul.dot_general,
        bias: bool = False,
    ):
        self.dtype = dtype
        self.dot_general = dot_general
        self.kernel = nnx.Param(normal_init(std)(rngs.params(), (d_in, d_out), param_dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype), axes=axes[1:]) if bias else None
        # delayed-scaling FP8 keeps amax histories (input, kernel, output gradient) beside the kernel
        self.fp8_meta = (
            Fp8Meta(jnp.zeros((3, dot_general.history), jnp.float32), axes=("norm", "norm"))
            if isinstance(dot_general, DelayedFp8)
            else None
        )
        self.lora = None  # a model/lora.py LoraAdapter once adapters are attached: y += scale * x A B

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        w = self.kernel[...].astype(self.dtype)
        dot = (
            self.dot_general
            if self.fp8_meta is None
            else self.dot_general.dot_general_with(self.fp8_meta[...])
        )
        y = dot(x, w, (((x.ndim - 1,), (0,)), ((), ())))
        if self.lora is not None:
            y = y + self.lora(x)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding [V, H]; `attend` reuses it as a tied LM head."""

    def __init__(
        self, vocab: int, dim: int, *, rngs: nnx.Rngs, std: float, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        self.dtype = dtype
        self.embedding = nnx.Param(
            normal_init(std)(rngs.params(), (vocab, dim), param_dtype), axes=("vocab", "embed")
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array, table_t: jax.Array | None = None) -> jax.Array:
        """x @ E^T; table_t: `transposed()`, computed once outside a decode loop (XLA:CPU runs
        x @ E^T with E [V, H] about 1.7x slower than with E^T laid out as [H, V])."""
        x = x.astype(self.dtype)
        if table_t is not None:
            return matmul.dot_general(x, table_t, (((x.ndim - 1,), (0,)), ((), ())))
        e = self.embedding[...].astype(self.dtype)
        return matmul.dot_general(x, e, (((x.ndim - 1,), (1,)), ((), ())))

    def transposed(self) -> jax.Array:
        """The table as [H, V] in the compute dtype."""
        return self.embedding[...].astype(self.dtype).T


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN, the shared experts and the MTP layer FFN."""

    def __init__(
        self,
        hidden: int,
        inter: int,
        *,
        rngs: nnx.Rngs,
        std: float,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        dot_general: DotGeneral = matmul.dot_general,
    ):
        kw = dict(rngs=rngs, std=std, dtype=dtype, param_dtype=param_dtype, dot_general=dot_general)
        self.gate_proj = Linear(hidden, inter, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden, inter, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(inter, hidden, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
