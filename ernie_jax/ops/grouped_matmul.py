"""The grouped matmul of dropless MoE: rows sorted by expert, each row times its expert's kernel.

GPU and TPU run `jax.lax.ragged_dot` (grouped kernels). XLA:CPU has none: it expands a ragged dot
into one dense matmul over every group with the other groups' rows masked ([M, E*K] x [E*K, N]),
E times the FLOPs, and its backward is slower still (forward + backward of the default tiny MoE's
[1024, 128] x [8, 128, 128]: 11.4 ms). On CPU the rows are instead cut into blocks (`block_size`
rows) that each belong to one expert (every group padded to whole blocks, as grouped GEMM kernels
such as megablox lay them out) and a scan multiplies each block by its expert's kernel: at most
M + E * block rows of work (2.5 ms for the same shape). The branch is chosen when the program is
lowered (`jax.lax.platform_dependent`), so a TPU program compiled ahead of time on a CPU host still
gets `ragged_dot`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def ragged_dot(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """x [M, K] sorted by group (`sizes` [E] rows each; rows past their sum give zeros) @ w [E, K, N]
    -> [M, N] in x's dtype, as `jax.lax.ragged_dot`."""
    return jax.lax.platform_dependent(x, w, sizes, cpu=blocked_ragged_dot, default=jax.lax.ragged_dot)


def block_size(rows: int, groups: int) -> int:
    """Rows per block: the power of two nearest rows / (2 * groups) in [32, 256], so padding (at
    most a block per group) stays near half of the rows or less while blocks stay big enough for the
    matmuls (measured on CPU: [16384, 512] x [8, 512, 256] fwd + bwd 274 ms at 64, 168 ms at 256;
    [1024, 128] x [8, 128, 128] best at 32-64)."""
    return int(min(256, max(32, 2 ** round(math.log2(max(rows / (2 * groups), 1))))))


@jax.custom_vjp
def blocked_ragged_dot(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    """`ragged_dot` as a scan over blocks of rows of one group each (the CPU branch)."""
    return _blocked(x, w, _block_rows(sizes, x.shape[0], w.shape[0]))


def _blocked(x, w, layout):
    group, rows, slots = layout
    return _unblock(_per_block(_gather_rows(x, rows), w, group), slots)


def _forward(x, w, sizes):
    layout = _block_rows(sizes, x.shape[0], w.shape[0])  # kept for the backward, not recomputed
    return _blocked(x, w, layout), (x, w, sizes, layout)


def _backward(res, dy):
    """dx: the same blocks times each group's transposed kernel; dw: each block's x^T dy added into
    its group's slice of one carried [E, K, N] (autodiff of the forward scan built a zero [E, K, N]
    per block instead: 2-3x slower)."""
    x, w, sizes, (group, rows, slots) = res
    xb, dyb = _gather_rows(x, rows), _gather_rows(dy.astype(x.dtype), rows)

    def one(dw, block_in):
        xj, dyj, g = block_in
        wg = jax.lax.dynamic_index_in_dim(w, g, keepdims=False)
        dw = dw.at[g].add(jnp.matmul(xj.T, dyj, preferred_element_type=dw.dtype))
        return dw, jnp.matmul(dyj, wg.T).astype(x.dtype)

    dw, dxb = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), (xb, dyb, group))
    dsizes = np.zeros(sizes.shape, jax.dtypes.float0)
    return _unblock(dxb, slots), dw.astype(w.dtype), dsizes


blocked_ragged_dot.defvjp(_forward, _backward)


def _per_block(xb: jax.Array, w: jax.Array, group: jax.Array) -> jax.Array:
    """xb [NB, block, K] @ w[group] [NB, K, N], one block per scan step (no [NB, K, N] copy of w)."""

    def one(_, block_in):
        xj, g = block_in
        return None, jnp.matmul(xj, jax.lax.dynamic_index_in_dim(w, g, keepdims=False)).astype(xb.dtype)

    return jax.lax.scan(one, None, (xb, group))[1]


def _gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    return jnp.take(x, rows, axis=0, mode="fill", fill_value=0)  # padding slots (row m) read zeros


def _unblock(yb: jax.Array, slots: jax.Array) -> jax.Array:
    """Rows back from the blocks [NB, block, N] -> [M, N] by a gather (a zero-filled [M, N] and a
    scatter cost ~10% more of a CPU MoE layer); rows past the groups read zeros."""
    return jnp.take(yb.reshape(-1, yb.shape[-1]), slots, axis=0, mode="fill", fill_value=0)


def _block_rows(sizes: jax.Array, m: int, groups: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each group's rows padded to whole blocks -> (group of each block [NB], source row of each
    block slot [NB, block], `m` where the slot is padding; each row's slot [M], NB * block for rows
    past the groups). NB = ceil(m / block) + groups bounds the blocks any split of m rows needs;
    unused blocks are all padding."""
    block = block_size(m, groups)
    count = jnp.ceil(sizes / block).astype(jnp.int32)  # blocks per group
    end = jnp.cumsum(count)
    first_row = jnp.cumsum(sizes) - sizes
    blocks = jnp.arange(-(-m // block) + groups)
    group = jnp.minimum(jnp.searchsorted(end, blocks, side="right"), groups - 1).astype(jnp.int32)
    offset = (blocks - (end - count)[group])[:, None] * block + jnp.arange(block)[None]  # row in group
    real = (blocks < end[-1])[:, None] & (offset < sizes[group][:, None])
    row = jnp.arange(m)
    row_group = jnp.searchsorted(jnp.cumsum(sizes), row, side="right")  # `groups` past the groups
    g = jnp.minimum(row_group, groups - 1)
    slot = jnp.where(row_group < groups, (end - count)[g] * block + row - first_row[g], blocks.size * block)
    return group, jnp.where(real, first_row[group][:, None] + offset, m), slot
