"""Orbax checkpoints of a training run: atomic, asynchronous, resumable exactly, re-shardable.

Each step directory holds three items:

    params  the parameter dict (what ``sample.py --checkpoint`` reads, alone)
    train   {"step", "opt_state", "rng"}: the rest of the TrainState
    ema     the parameters' moving average, when the run keeps one (``config.ema_decay``)
    data    the grain iterator's state, one file per process

Orbax writes a step under a temporary name and renames it when complete, so a run killed at any
point leaves only whole checkpoints; restore picks the latest. Restoring takes abstract targets
(``jax.ShapeDtypeStruct`` with a sharding), so a checkpoint written on one mesh restores onto any
other (8 devices -> 2, FSDP -> data parallel).
"""

import os

import grain.python as grain
import jax
import orbax.checkpoint as ocp

from lasad_jax.training import TrainState


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` for :class:`TrainState` + data iterator."""

  def __init__(self, directory, *, keep=3, async_save=True, read_only=False):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, state, data_iter=None):
    """Start saving ``state`` at its step (asynchronously); returns at once."""
    items = dict(params=ocp.args.StandardSave(state.params),
                 train=ocp.args.StandardSave(
                     {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}))
    if state.ema is not None:
      items["ema"] = ocp.args.StandardSave(state.ema)
    if data_iter is not None:
      items["data"] = grain.PyGrainCheckpointSave(data_iter)
    self.manager.save(int(state.step), args=ocp.args.Composite(**items))

  def restore(self, abstract_state, data_iter=None, step=None):
    """Restore onto ``abstract_state`` (a TrainState of ShapeDtypeStructs with shardings) and, if
    given, set ``data_iter`` to where it was. Returns the restored TrainState."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    a = abstract_state
    items = dict(params=ocp.args.StandardRestore(a.params),
                 train=ocp.args.StandardRestore(
                     {"step": a.step, "opt_state": a.opt_state, "rng": a.rng}))
    if a.ema is not None:
      items["ema"] = ocp.args.StandardRestore(a.ema)
    if data_iter is not None:
      items["data"] = grain.PyGrainCheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    t = out["train"]
    return TrainState(step=t["step"], params=out["params"], opt_state=t["opt_state"], rng=t["rng"],
                      ema=out["ema"] if a.ema is not None else None)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory, abstract_params, step=None, item="params"):
  """Only the parameters (or, with ``item="ema"``, their moving average): from a training run's checkpoint directory (latest step unless ``step``)
  or from a plain Orbax directory of the parameter dict (``StandardCheckpointer`` layout).
  Leaves of ``abstract_params`` without a sharding land on the first local device, whatever mesh
  wrote the checkpoint."""
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_params = jax.tree.map(
      lambda x: x if getattr(x, "sharding", None) is not None else
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), abstract_params)
  directory = os.path.abspath(directory)
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")   # a train.py workdir
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  if step is not None:
    if item not in mngr.item_metadata(step):
      mngr.close()
      raise FileNotFoundError(f"checkpoint {directory} step {step} has no {item!r} item")
    out = mngr.restore(step, args=ocp.args.Composite(
        **{item: ocp.args.StandardRestore(abstract_params)}))
    mngr.close()
    return out[item], step
  mngr.close()
  if not os.path.exists(os.path.join(directory, "_CHECKPOINT_METADATA")) and not any(
      f.endswith(".zarray") or f == "_METADATA" for f in os.listdir(directory)):
    raise FileNotFoundError(f"{directory} holds no checkpoint (neither a train.py run nor an Orbax "
                            f"parameter directory)")
  return ocp.StandardCheckpointer().restore(directory, abstract_params), None


def abstract(tree, shardings=None):
  """ShapeDtypeStructs of ``tree`` (arrays or structs), with ``shardings`` if given."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
