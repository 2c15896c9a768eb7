"""Device mesh from config and the one logical-axis rules table.

Every param carries logical axis names in its `axes` metadata (set where the param is created);
`LOGICAL_RULES` maps them to mesh axes. Parallel layouts change in config (`mesh.*`), never in
model code. Stacked layers add leading axes; they stay unsharded except the pipelined stack's
(MoE units, or all layers of a dense model), whose layer axis is split over `pipeline`. Everything
outside that stack is split over `pipeline` like FSDP (embed dims) and batch-wise (activations), so
stages hold and compute only their share of it.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ernie_jax.config import Config, MeshConfig, pipelined_stack
from ernie_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "context", "tensor", "expert", "pipeline")

# logical axis -> mesh axes (in order of preference); MaxText-style, one place for the whole model.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert", "pipeline"),  # activations: every non-model axis splits the batch
    "vocab": ("tensor",),
    # ZeRO-3 by sharding: over fsdp, over the context shards (which hold the same batch rows, as in
    # MaxText) and over pipeline where the layer axis is not
    "embed": ("fsdp", "context", "pipeline"),
    "mlp": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "exp": ("expert",),
    "norm": (),
    # MTP's [emb; h] input dim: splitting a concatenated dim over `tensor` made XLA's partitioner
    # compute wrong values under autodiff (seen with data x tensor + block constraints); 2H x H is small
    "concat": (),
}


def mesh_shape(m: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with the one -1 resolved; one-line errors for impossible layouts."""
    sizes = {a: getattr(m, a) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in free)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: fixed axes use {fixed} devices, which does not divide the {num_devices} "
                f"available; change the mesh sizes"
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        layout = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise ConfigError(
            f"mesh {layout} uses {math.prod(sizes.values())} devices but {num_devices} are available; "
            f"make the product equal or set one axis to -1"
        )
    return sizes


def check_mesh_fits_model(cfg: Config, sizes: dict[str, int]) -> None:
    if cfg.moe.num_experts and cfg.moe.num_experts % sizes["expert"]:
        raise ConfigError(
            f"moe.num_experts={cfg.moe.num_experts} is not divisible by mesh.expert={sizes['expert']}"
        )
    if sizes["context"] != cfg.mesh.context:
        raise ConfigError(
            f"mesh.context={cfg.mesh.context} but the mesh has {sizes['context']} context shards"
        )
    if sizes["pipeline"] != cfg.mesh.pipeline:
        raise ConfigError(
            f"mesh.pipeline={cfg.mesh.pipeline} but the mesh has {sizes['pipeline']} pipeline stages"
        )


def _is_tpu(devices) -> bool:
    return devices[0].platform == "tpu"


def slices_of(devices) -> tuple[str, list]:
    """(what a slice is, the devices of each slice in order): TPU slices (`slice_index`), else
    processes (a GPU / CPU node runs one)."""
    attr = "slice_index" if _is_tpu(devices) else "process_index"
    groups: dict = {}
    for d in devices:
        groups.setdefault(getattr(d, attr), []).append(d)
    return ("slices" if attr == "slice_index" else "processes"), [groups[k] for k in sorted(groups)]


def dcn_shape(m: MeshConfig, sizes: dict[str, int], devices) -> tuple[dict[str, int], list] | None:
    """(the across-slice part of each axis, the devices of each slice), or None for one slice (the
    flat mesh); one-line errors when it does not fit the job's slices or the axes' total sizes."""
    dcn = {a: getattr(m.dcn, a) for a in MESH_AXES}
    if math.prod(dcn.values()) == 1:
        return None
    what, groups = slices_of(devices)
    layout = " x ".join(f"{a}={v}" for a, v in dcn.items() if v > 1)
    if math.prod(dcn.values()) != len(groups):
        raise ConfigError(
            f"mesh.dcn {layout} spans {math.prod(dcn.values())} slices but the job has {len(groups)} "
            f"{what}; make the product of mesh.dcn.* equal {len(groups)}"
        )
    if len({len(g) for g in groups}) > 1:
        raise ConfigError(f"mesh.dcn: the {what} hold different numbers of devices; use equal slices")
    for a, v in dcn.items():
        if sizes[a] % v:
            raise ConfigError(
                f"mesh.dcn.{a}={v} does not divide mesh.{a}={sizes[a]} (the axis's total over all "
                f"slices); make mesh.{a} a multiple of it"
            )
    return dcn, groups


def device_grid(cfg: Config, devices) -> np.ndarray:
    """`devices` arranged as the mesh of `cfg.mesh` (axes MESH_AXES): a reshape of the list for one
    slice. With `mesh.dcn.*` it is built as mesh_utils.create_hybrid_device_mesh builds one: a block
    per slice (the axes' within-slice sizes), the blocks tiled by the across-slice sizes, so each
    axis's across-slice part is outermost and everything else stays on the fast links. Inside a block
    the devices keep process order (each process's devices together, the batch rows the data loaders
    give it), not the torus order create_device_mesh would pick, which scatters a host's rows."""
    devices = list(devices)
    sizes = mesh_shape(cfg.mesh, len(devices))
    check_mesh_fits_model(cfg, sizes)
    hybrid = dcn_shape(cfg.mesh, sizes, devices)
    if hybrid is None:
        return np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
    dcn, groups = hybrid
    ici = tuple(sizes[a] // dcn[a] for a in MESH_AXES)
    blocks = np.empty(len(groups), object)
    for i, group in enumerate(groups):
        blocks[i] = np.asarray(sorted(group, key=lambda d: (d.process_index, d.id))).reshape(ici)
    return np.block(blocks.reshape(tuple(dcn[a] for a in MESH_AXES)).tolist())


def build_mesh(cfg: Config, devices=None) -> Mesh:
    grid = device_grid(cfg, devices if devices is not None else jax.devices())
    mesh = Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    check_process_rows(mesh)
    return mesh


def check_process_rows(mesh: Mesh) -> None:
    """The data loaders give process p the p-th contiguous block of a batch's rows: the mesh must
    place them there (it does unless an across-slice split sits inside a batch axis split within
    slices)."""
    n = data_parallel_size(mesh)
    procs = sorted({d.process_index for d in mesh.devices.flat})
    if len(procs) == 1 or n % len(procs):
        return
    held: dict[int, set] = {}
    for d, idx in batch_sharding(mesh, 1).devices_indices_map((n,)).items():
        held.setdefault(d.process_index, set()).add(idx[0].start or 0)
    block = n // len(procs)
    for rank, p in enumerate(procs):
        if held[p] != set(range(rank * block, (rank + 1) * block)):
            raise ConfigError(
                "mesh.dcn: each process would hold scattered batch rows; split across slices on the outer "
                "batch axes first (mesh.dcn.data, then fsdp, expert, pipeline), or keep the batch axes "
                "inside a slice at size 1"
            )


def logical_to_spec(
    axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, layer_axis: str | None = None
) -> P:
    """PartitionSpec for a param with logical `axes` (trailing dims) and `shape` (maybe stacked);
    `layer_axis` shards the first stacked (layer) dim.

    A mesh axis is used at most once per param, and only on a dimension it divides evenly."""
    lead = len(shape) - len(axes)
    used: set[str] = {layer_axis} if layer_axis else set()
    spec: list = [None] * lead
    if layer_axis:
        spec[0] = layer_axis
    for name, dim in zip(axes, shape[lead:]):
        chosen = []
        for mesh_axis in LOGICAL_RULES.get(name, ()) if name else ():
            size = mesh.shape.get(mesh_axis, 1)
            if mesh_axis in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(mesh_axis)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict:
    """Pure dict of NamedShardings for every variable of an (abstract) nnx state."""
    flat = {}
    entries = list(nnx.to_flat_state(abstract_state))
    staged = pipelined_stack("units" in {p[0] for p, _ in entries}) if mesh.shape["pipeline"] > 1 else None
    for path, var in entries:
        axes = var.get_metadata().get("axes") if hasattr(var, "get_metadata") else None
        shape = tuple(var.shape) if hasattr(var, "shape") else tuple(var[...].shape)
        # the layer axis goes to the stages when it splits evenly; otherwise (uneven stages) the
        # stack is split over `pipeline` like FSDP and regrouped by stage inside the step
        layer_axis = "pipeline" if path[0] == staged and shape[0] % mesh.shape["pipeline"] == 0 else None
        spec = logical_to_spec(tuple(axes or ()), shape, mesh, layer_axis) if axes or layer_axis else P()
        flat[path] = NamedSharding(mesh, spec)
    out: dict = {}
    for path, sharding in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = sharding
    return out


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    batch_axes = activation_batch_axes(mesh)
    spec = [None] * ndim
    spec[batch_dim] = batch_axes if batch_axes else None
    return NamedSharding(mesh, P(*spec))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])


def activation_batch_axes(mesh, in_stage: bool = False) -> tuple[str, ...]:
    """The mesh axes (size > 1) that split an activation's batch dim. Inside a pipeline stage,
    `pipeline` is the stage axis, so the stage's microbatch splits over the other axes only."""
    return tuple(
        a for a in LOGICAL_RULES["batch"] if mesh.shape[a] > 1 and not (in_stage and a == "pipeline")
    )


def token_groups(
    batch: int, seq_len: int, skip: tuple[str, ...] = ("pipeline",)
) -> tuple[int, int, tuple[str, ...]]:
    """(row shards, sequence shards, their mesh axes) that activations [B, S, ...] of this shape
    are split into under the mesh set with `jax.set_mesh` ((1, 1, ()) without one): the batch
    axes that divide B, but those in `skip` (`pipeline`: MoE layers run inside pipeline stages),
    then the context axis. Per-token work that is not independent across tokens (expert dispatch) runs once
    per group, group g = row shard x seqs + sequence shard."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1, 1, ()
    rows, axes = 1, []
    for a in LOGICAL_RULES["batch"]:
        n = mesh.shape.get(a, 1) if a not in skip else 1
        if n > 1 and batch % (rows * n) == 0:
            rows *= n
            axes.append(a)
    context = mesh.shape.get("context", 1)
    seqs = context if context > 1 and seq_len % context == 0 else 1
    return rows, seqs, tuple(axes) + (("context",) if seqs > 1 else ())


def constrain_groups(x, axes: tuple[str, ...]):
    """Pin dim 0 (the token groups of `token_groups`) to `axes`, other dims left to XLA."""
    return jax.lax.with_sharding_constraint(x, P(axes, *[P.UNCONSTRAINED] * (x.ndim - 1)))


def describe(mesh: Mesh, m: MeshConfig | None = None) -> str:
    """e.g. `data=2 x fsdp=4`, and `(dcn data=2)`: the part of each axis across slices."""
    flat = " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES if mesh.shape[a] > 1) or "single device"
    dcn = " x ".join(f"{a}={getattr(m.dcn, a)}" for a in MESH_AXES if m and getattr(m.dcn, a) > 1)
    return f"{flat} (dcn {dcn})" if dcn else flat


def constrain_batch(x, in_stage: bool = False):
    """Pin activations [B, S, ...] batch-sharded, and sequence-sharded over `context` (other dims
    left to XLA), under the mesh set with `jax.set_mesh`; a no-op without one. `in_stage`: inside
    a pipeline stage, where `pipeline` is the stage axis and the batch splits over the other axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "pipeline" not in mesh.axis_names:
        return x
    axes = activation_batch_axes(mesh, in_stage)
    batch = axes if axes and x.shape[0] % math.prod(mesh.shape[a] for a in axes) == 0 else None
    context = mesh.shape.get("context", 1)
    seq = "context" if context > 1 and x.ndim > 1 and x.shape[1] % context == 0 else None
    if batch is None and seq is None:
        return x
    rest = [P.UNCONSTRAINED] * (x.ndim - 1)
    if x.ndim > 1:
        rest[0] = seq if seq is not None else P.UNCONSTRAINED
    return jax.lax.with_sharding_constraint(x, P(batch if batch is not None else P.UNCONSTRAINED, *rest))


def place_batch(batch: dict, mesh: Mesh, batch_dim: int) -> dict:
    """Process-local numpy batch -> global arrays split over the data-parallel mesh axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, batch_dim), v)
        for k, v in batch.items()
    }
