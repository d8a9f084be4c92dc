"""A deterministic, checkpointable grain loader shared by every data source."""

import grain.python as grain


def make_loader(source, batch_size, *, seed, shuffle=True, num_epochs=None, shard_index=0,
                shard_count=1, operations=(), worker_count=0):
  """A grain DataLoader of batches (drop_remainder) over a random-access ``source``, sharded per
  process (``shard_index`` of ``shard_count``). The same seed gives the same stream; its
  iterator's ``get_state()``/``set_state()`` (or Orbax's ``grain.PyGrainCheckpointSave``) resume
  the stream exactly. ``operations`` run per record before batching (e.g. random crops)."""
  if batch_size <= 0 or batch_size > len(source) // shard_count:
    raise ValueError(f"`batch_size` (per process) must be in [1, {len(source) // shard_count}] "
                     f"for a source of {len(source)} records over {shard_count} processes, got "
                     f"{batch_size}")
  sampler = grain.IndexSampler(
      len(source), shuffle=shuffle, seed=seed, num_epochs=num_epochs,
      shard_options=grain.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                       drop_remainder=True))
  return grain.DataLoader(data_source=source, sampler=sampler,
                          operations=[*operations, grain.Batch(batch_size, drop_remainder=True)],
                          worker_count=worker_count)
