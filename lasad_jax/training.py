"""Training LASADGen (DESIGN.md §5): state, optimizer, sharded train step, and the loop.

AdamW (b1 0.9, b2 0.95), weight decay on matrices only, global-norm clipping, warm-up then cosine
(or constant) learning rate; class labels dropped to the null class with probability
``label_dropout`` (for CFG). Next-token cross-entropy over all image tokens, bf16 compute (the
model config's ``dtype``) with float32 master weights; optional remat and gradient accumulation.

:func:`train_and_evaluate` is the whole job behind ``train.py``: mesh, sharded state, grain data,
Orbax checkpoints with exact resume, held-out NLL, progress lines, ``metrics.jsonl``, a sample grid.
"""

import functools
import json
import math
import os
import time

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lasad_jax import data as D
from lasad_jax import model as M
from lasad_jax import sharding as S
from lasad_jax.lina import objective as LINA


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar
  params: dict
  opt_state: optax.OptState
  rng: jax.Array         # raw PRNG key data (uint32 [2]): plain arrays checkpoint everywhere
  ema: dict | None = None  # exponential moving average of params (config.ema_decay > 0)


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or inf; the last good checkpoint is kept."""


def decay_mask(params):
  """Weight decay on matrices (projections, embeddings), not on norms, gate lower bounds or
  boundary logits. Block parameters carry a leading layer axis: a matrix there has ndim 3."""
  mask = {k: v.ndim >= 2 for k, v in params.items() if k != "blocks"}
  mask["blocks"] = {k: v.ndim >= 3 for k, v in params["blocks"].items()}
  return mask


def learning_rate(cfg):
  warm = max(cfg.warmup_steps, 1)
  if cfg.get("lr_schedule", "cosine") == "constant":
    return optax.warmup_constant_schedule(0.0, cfg.learning_rate, warm)
  if cfg.get("lr_schedule", "cosine") != "cosine":
    raise ValueError(f"config.lr_schedule must be 'cosine' or 'constant', got {cfg.lr_schedule!r}")
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warm,
                                            max(cfg.num_steps, cfg.warmup_steps + 1))


def make_optimizer(cfg):
  """AdamW after global-norm clipping (``grad_clip`` 0: none, as LINA trains)."""
  mask = LINA.decay_mask if LINA.is_lina(cfg) else decay_mask
  adamw = optax.adamw(learning_rate(cfg), b1=0.9, b2=0.95, weight_decay=cfg.weight_decay,
                      mask=mask)
  if not cfg.grad_clip:
    return optax.chain(optax.identity(), adamw)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def create_train_state(cfg, seed=None):
  """A fresh state (parameters from ``seed``, default ``cfg.seed``). Wrap in ``jax.jit`` with
  ``out_shardings`` to create it sharded (see :func:`state_shardings`)."""
  seed = cfg.seed if seed is None else seed
  if LINA.is_lina(cfg):
    params = LINA.init_params(cfg, seed)
  else:
    params = M.LASADGen(cfg, rngs=nnx.Rngs(seed)).params()
  ema = jax.tree.map(jnp.copy, params) if cfg.get("ema_decay", 0.0) else None
  return TrainState(step=jnp.int32(0), params=params, opt_state=make_optimizer(cfg).init(params),
                    rng=jax.random.key_data(jax.random.key(seed + 1)), ema=ema)


def loss_fn(cfg, params, tokens, labels, rng, label_dropout):
  """Mean next-token cross-entropy (nats per token); LINA: its flow-matching loss."""
  if LINA.is_lina(cfg):
    return LINA.loss_fn(cfg, params, {"tokens": tokens, "label": labels}, rng, label_dropout)
  drop = jax.random.bernoulli(rng, label_dropout, labels.shape)
  labels = jnp.where(drop, cfg.num_classes, labels)
  logits = M.forward(cfg, params, tokens, labels)
  # The target logit by a masked sum rather than take_along_axis: the same value, and its
  # gradient is elementwise, so d logits is written once, in bf16, instead of a float32 softmax
  # gradient, a scatter into it and a conversion (the loss's kernels 5.7 -> 3.7 ms per
  # LASADGen-L step on the H100, BENCHMARKS.md session 13).
  hit = jnp.arange(logits.shape[-1], dtype=jnp.int32) == tokens[..., None]
  nll = jax.nn.logsumexp(logits, -1) - jnp.sum(jnp.where(hit, logits, 0.0), -1)
  return jnp.mean(nll)


def _inputs(batch):
  """The model input of a batch: token ids, or (LINA on extracted latents) float latents."""
  return batch["tokens"] if "tokens" in batch else batch["latents"]


def _grads(cfg, params, batch, key):
  """Loss and gradients, over ``cfg.grad_accum`` micro-batches (summed in float32)."""
  n = cfg.get("grad_accum", 1)
  grad_fn = jax.value_and_grad(
      lambda p, t, l, k: loss_fn(cfg, p, t, l, k, cfg.label_dropout))
  if n == 1:
    return grad_fn(params, _inputs(batch), batch["label"], key)
  micro = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)

  def body(carry, xs):
    mb, i = xs
    loss, g = grad_fn(params, _inputs(mb), mb["label"], jax.random.fold_in(key, i))
    return jax.tree.map(jnp.add, carry, (loss, g)), None

  zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, g), _ = jax.lax.scan(body, zero, (micro, jnp.arange(n)))
  return loss / n, jax.tree.map(lambda x: x / n, g)


def _train_step(cfg, state, batch):
  key, sub = jax.random.split(jax.random.wrap_key_data(state.rng))
  loss, grads = _grads(cfg, state.params, batch, sub)
  # Materialise the gradients before the optimizer reads them. With the layers unrolled
  # (scan_layers False) each stacked [L, ...] weight gradient is a sum of L padded per-layer
  # slices; XLA fused that pad-and-add chain into the global-norm reductions, which then ran at
  # ~0.05 TB/s (16 ms of LASADGen-L's 396 ms step on the H100, BENCHMARKS.md session 11).
  grads = jax.lax.optimization_barrier(grads)
  updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                 lr=learning_rate(cfg)(state.step))
  ema = state.ema
  if ema is not None:
    ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1 - cfg.ema_decay) * p, ema, params)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                    rng=jax.random.key_data(key), ema=ema), metrics


train_step = functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))(_train_step)
train_step.__doc__ = """One optimizer step, unsharded. ``cfg`` must be hashable (FrozenConfigDict)."""


def make_train_step(cfg, mesh, state_sharding):
  """The sharded step: ``state`` keeps ``state_sharding``, the batch is split over every device."""
  step = jax.jit(functools.partial(_train_step, cfg),
                 in_shardings=(state_sharding, S.batch_sharding(mesh)),
                 out_shardings=(state_sharding, S.replicated(mesh)), donate_argnums=(0,))

  def sharded_step(state, batch):
    with jax.set_mesh(mesh):   # traced under the mesh: Pallas kernels run per device (over_batch)
      return step(state, batch)
  return sharded_step


@functools.partial(jax.jit, static_argnums=(0,))
def eval_nll(cfg, params, batch):
  """Held-out NLL per token with the true labels (no dropout); LINA: its flow-matching loss at a
  fixed key (the same masks and noise at every evaluation)."""
  return loss_fn(cfg, params, _inputs(batch), batch["label"], jax.random.key(0), 0.0)


def state_shardings(cfg, mesh):
  """(abstract TrainState, its NamedShardings by the fsdp rule) without allocating anything."""
  shapes = jax.eval_shape(lambda: create_train_state(cfg))
  return shapes, S.tree_shardings(mesh, shapes,
                                  cfg.mesh.get("min_shard_size", S.MIN_SHARD_SIZE))


def flops_per_token(cfg):
  """Model FLOPs per trained token (forward + backward = 3x forward): 6 x the matmul parameters
  plus the attention term (LASAD: state update and read-out, 4HKV, and the intra-chunk products
  of a 64-token chunk, 64H(K+V)/2 x 2; softmax: causal QK^T and AV over the mean context)."""
  if LINA.is_lina(cfg):
    return LINA.flops_per_token(cfg)
  d, L, h, dh = cfg.dim, cfg.num_layers, cfg.num_heads, cfg.head_dim
  hid = M.mlp_hidden(d)
  matmul = L * (4 * d * d + 3 * d * hid) + d * cfg.vocab_size
  n = int(np.prod(cfg.grid))
  if cfg.attention == "softmax":
    attn = L * 2 * 2 * (n / 2) * d
  else:
    attn = L * (4 * h * dh * dh + 2 * 64 * h * dh)
  return 3 * (2 * matmul + attn)


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device):
  """bf16 dense peak of a known GPU ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"), else None."""
  model = getattr(device, "device_kind", "").replace("NVIDIA ", "").split(" ")[0].split("-")[0]
  return PEAK_BF16.get(model)


# ---------------------------------------------------------------------------------------------
# The loop.


def check_workdir(workdir):
  if not workdir:
    raise ValueError("--workdir is required: the directory for checkpoints and metrics")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir {workdir!r} is not a writable directory ({e.strerror}); "
                          f"choose a directory you can write to") from None


def _keep_metrics_upto(path, step):
  """On resume: drop records of steps after the restored checkpoint (they will be recomputed)
  and any half-written last line of a killed run."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if rec.get("step", 0) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def _fmt_time(s):
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def evaluate(cfg, params, mesh):
  """Mean held-out NLL per token over ``cfg.eval_batches`` fixed batches of the test split."""
  src, ops = D.get_source(cfg, "test")
  n = mesh.devices.size
  bs = min(cfg.batch_size, len(src) // n * n)
  loader = D.make_loader(src, bs, seed=0, shuffle=False, num_epochs=1, operations=ops)
  total, count = 0.0, 0
  for i, batch in enumerate(loader):
    if i >= cfg.eval_batches:
      break
    with jax.set_mesh(mesh):
      total += float(eval_nll(cfg, params, S.global_batch(mesh, batch)))
    count += 1
  return total / max(count, 1)


def train_and_evaluate(cfg, workdir, *, log=print):
  """Train ``cfg`` in ``workdir`` (resuming from its latest checkpoint), evaluate, and write a
  sample grid. Returns the final TrainState. Raises :class:`TrainingDiverged` on a NaN/inf loss
  (the last good checkpoint stays)."""
  from lasad_jax.checkpointing import Checkpointer, abstract as abstract_of  # imports TrainState

  cfg = ml_collections.FrozenConfigDict(cfg)
  D.check_config(cfg)
  check_workdir(workdir)
  mesh = S.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  S.check_batch(cfg.batch_size, mesh)
  if cfg.batch_size % cfg.grad_accum or (cfg.batch_size // cfg.grad_accum) % mesh.devices.size:
    raise ValueError(f"config.batch_size={cfg.batch_size} must split into config.grad_accum="
                     f"{cfg.grad_accum} micro-batches that each divide over "
                     f"{mesh.devices.size} devices")
  if cfg.num_steps <= 0:
    raise ValueError(f"config.num_steps must be positive, got {cfg.num_steps}")
  pid, nproc = jax.process_index(), jax.process_count()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json(indent=1))

  src, ops = D.get_source(cfg, "train")
  data_iter = iter(D.make_loader(src, cfg.batch_size // nproc, seed=cfg.seed, shard_index=pid,
                                 shard_count=nproc, operations=ops))
  abstract, shardings = state_shardings(cfg, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  latest = ckpt.latest_step()
  if latest is None:
    state = jax.jit(functools.partial(create_train_state, cfg), out_shardings=shardings)()
    if os.path.exists(metrics_path) and pid == 0:
      os.remove(metrics_path)
    count = LINA.M.count_params(cfg) if LINA.is_lina(cfg) else M.count_params(cfg)
    log(f"new run in {workdir}: {count / 1e6:.2f}M parameters, mesh "
        f"{dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} device(s)")
  else:
    state = ckpt.restore(abstract_of(abstract, shardings), data_iter)
    if pid == 0:
      _keep_metrics_upto(metrics_path, latest)
    log(f"resumed {workdir} from step {latest} on mesh {dict(mesh.shape)}")
  step_fn = make_train_step(cfg, mesh, shardings)

  tokens_per_step = cfg.batch_size * int(np.prod(cfg.grid))
  peak = peak_flops(jax.devices()[0])
  fpt = flops_per_token(cfg)
  step = int(state.step)
  pending, t_log, s_log, t_start, s_start = [], time.perf_counter(), step, time.perf_counter(), step
  mf = open(metrics_path, "a") if pid == 0 else None

  def write(rec):
    if mf is not None:
      mf.write(json.dumps(rec) + "\n")
      mf.flush()

  def flush():
    """Fetch pending step metrics, stop on a non-finite loss, write them."""
    for s, m in pending:
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      if not math.isfinite(m["loss"]):
        ckpt.wait()
        raise TrainingDiverged(
            f"loss is {m['loss']} at step {s}: stopping. The last good checkpoint (step "
            f"{ckpt.latest_step()}) is kept in {ckpt.directory}; lower config.learning_rate or "
            f"check the data, then rerun to resume from it.")
      write({"step": s, **m})
    pending.clear()

  try:
    while step < cfg.num_steps:
      batch = S.global_batch(mesh, next(data_iter))
      state, m = step_fn(state, batch)
      step += 1
      pending.append((step, m))
      last = step == cfg.num_steps
      if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or last:
        loss = float(pending[-1][1]["loss"])
        flush()
        now = time.perf_counter()
        sps = (step - s_log) / max(now - t_log, 1e-9)
        eta = (cfg.num_steps - step) * (now - t_start) / max(step - s_start, 1)
        perf = {"steps_per_s": sps, "tokens_per_s": sps * tokens_per_step}
        if peak:
          perf["mfu"] = sps * tokens_per_step * fpt / (peak * mesh.devices.size)
        write({"step": step, **perf})
        log(f"step {step}/{cfg.num_steps}  loss {loss:.4f}  {sps:.2f} steps/s  "
            f"{perf['tokens_per_s']:,.0f} tok/s" +
            (f"  MFU {100 * perf['mfu']:.1f}%" if peak else "") + f"  ETA {_fmt_time(eta)}")
        t_log, s_log = now, step
      if step % cfg.eval_every == 0 or last:
        nll = evaluate(cfg, state.params, mesh)
        write({"step": step, "eval_nll": nll})
        what = "flow-matching loss" if LINA.is_lina(cfg) else "NLL"
        unit = "" if LINA.is_lina(cfg) else " nats/token"
        log(f"step {step}: held-out {what} {nll:.4f}{unit}")
      if step % cfg.checkpoint_every == 0 or last:
        ckpt.save(state, data_iter)
    ckpt.wait()
  finally:
    if mf is not None:
      mf.close()
    ckpt.close()
  return state


def sample_grid(cfg, params, path, *, seed=0):
  """Sample ``cfg.sample.num_per_class`` images per class and write them as one PNG (rows =
  classes) where the dataset can render tokens; returns the tokens [C, n, h, w]."""
  from lasad_jax import sampling as Smp
  cfg = ml_collections.FrozenConfigDict(cfg)
  if LINA.is_lina(cfg):
    return LINA.sample_grid(cfg, params, path, seed=seed)
  n, (h, w) = cfg.sample.num_per_class, cfg.grid
  classes = min(cfg.num_classes, 16)
  model = M.LASADGen(cfg, rngs=nnx.Rngs(0))
  from lasad_jax.convert import load_params
  load_params(model, params)
  labels = jnp.repeat(jnp.arange(classes), n)
  toks = Smp.sample(model, labels, height=h, width=w, rng=jax.random.key(seed),
                    cfg_scale=cfg.sample.cfg_scale, temperature=cfg.sample.temperature,
                    top_k=cfg.sample.top_k)
  toks = np.asarray(toks).reshape(classes, n, h, w)
  pix = D.to_pixels(cfg, toks.reshape(-1, h, w))
  if pix is not None:
    D.save_image_grid(pix, path, cols=n)
  return toks
