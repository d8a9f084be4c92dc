"""Device mesh and sharding rules for training (DESIGN.md §5).

One 2-D mesh with axes ``data`` and ``fsdp``. The batch is split over both axes (every device sees
its own rows); parameters and optimizer moments are split over ``fsdp`` along their largest
divisible axis and replicated over ``data``. With ``fsdp = 1`` this is pure data parallelism, with
``data = 1`` pure FSDP. XLA inserts the all-gathers and reduce-scatters from the shardings, except around Pallas kernels,
which it cannot partition: :func:`over_batch` runs those per device on its own rows.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH = P(AXES)   # batch axis split over every device
# Leaves smaller than this stay replicated: splitting a norm vector saves nothing and costs a
# collective.
MIN_SHARD_SIZE = 2 ** 14


def make_mesh(data=-1, fsdp=1, devices=None):
  """A ``(data, fsdp)`` mesh over ``devices`` (default: all). ``-1`` takes the remaining devices."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if fsdp == -1 and data == -1:
    raise ValueError("at most one of `mesh.data` and `mesh.fsdp` may be -1")
  if fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  if data <= 0 or fsdp <= 0 or data * fsdp != n:
    raise ValueError(
        f"mesh data={data} x fsdp={fsdp} does not cover the {n} devices; set config.mesh.data and "
        f"config.mesh.fsdp so that their product is {n} (or one of them to -1).")
  return jax.sharding.Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def _path_has(path, name):
  return any(getattr(k, "key", getattr(k, "name", None)) == name for k in path)


def spec_for(path, shape, fsdp_size, min_size=MIN_SHARD_SIZE):
  """The rule: split the largest axis divisible by the fsdp size (ties: the later axis), never the
  stacked layer axis of ``blocks`` leaves (it is scanned over); small leaves stay replicated."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  first = 1 if _path_has(path, "blocks") else 0
  best = None
  for ax in range(first, len(shape)):
    if shape[ax] % fsdp_size == 0 and (best is None or shape[ax] >= shape[best]):
      best = ax
  if best is None:
    return P()
  return P(*([None] * best + ["fsdp"]))


def tree_shardings(mesh, tree, min_size=MIN_SHARD_SIZE):
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs by :func:`spec_for`."""
  f = mesh.shape["fsdp"]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(path, np.shape(x), f, min_size)), tree)


def batch_sharding(mesh):
  return NamedSharding(mesh, BATCH)


def replicated(mesh):
  return NamedSharding(mesh, P())


def check_batch(batch_size, mesh, what="config.batch_size"):
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{what}={batch_size} is not divisible by the {n} devices of the mesh; use a "
                     f"multiple of {n} (e.g. {max(n, batch_size // n * n)}).")
  if batch_size % jax.process_count():
    raise ValueError(f"{what}={batch_size} is not divisible by the {jax.process_count()} processes")


def global_batch(mesh, local_batch):
  """Assemble per-process numpy batches (rows of this process) into global sharded arrays."""
  sh = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: jax.device_put(x, sh), local_batch)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sh, np.asarray(x)), local_batch)


def over_batch(fn, args, batched):
  """``fn(*args)``, run per device on its rows of the batch when a mesh with more than one device
  on ``data`` / ``fsdp`` is set (``jax.set_mesh``, as the train step does).

  Pallas kernels are opaque custom calls with no partitioning rule: left to XLA, a kernel on
  batch-sharded inputs is fed the whole batch (an all-gather) and run in full on every device
  (measured on 2 H200s: the LASAD kernels ran on the global batch, and the all-gathers took 160 ms
  of a 724 ms step). ``batched[i]`` says whether ``args[i]`` has the batch as its leading axis
  (else it is replicated); every output must have the batch leading. Without such a mesh, or
  when the batch does not divide over it, this is just ``fn(*args)``."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  axes = tuple(a for a in AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  n = int(np.prod([mesh.shape[a] for a in axes]))
  rows = next(x.shape[0] for x, b in zip(args, batched) if b and x is not None)
  if not axes or rows % n:
    return fn(*args)
  specs = tuple(P(axes) if b else P() for b in batched)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(axes), check_vma=False)(*args)
