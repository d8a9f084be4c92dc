"""Train state, optimizer and train step for LASADGen (DESIGN.md §5).

AdamW (b1 0.9, b2 0.95), weight decay on matrices only, global-norm clipping, warm-up then cosine
decay; class labels dropped to the null class with probability ``label_dropout`` (for CFG).
Next-token cross-entropy over all image tokens, float32 master weights.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lasad_jax import model as M


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


def decay_mask(params):
  """Weight decay on matrices (projections, embeddings), not on norms, gate lower bounds or
  boundary logits. Block parameters carry a leading layer axis: a matrix there has ndim 3."""
  mask = {k: v.ndim >= 2 for k, v in params.items() if k != "blocks"}
  mask["blocks"] = {k: v.ndim >= 3 for k, v in params["blocks"].items()}
  return mask


def make_optimizer(cfg):
  sched = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                             max(cfg.num_steps, cfg.warmup_steps + 1))
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask))


def create_train_state(cfg, seed=None):
  seed = cfg.seed if seed is None else seed
  params = M.LASADGen(cfg, rngs=nnx.Rngs(seed)).params()
  return TrainState(step=jnp.int32(0), params=params, opt_state=make_optimizer(cfg).init(params),
                    rng=jax.random.key(seed + 1))


def loss_fn(cfg, params, tokens, labels, rng, label_dropout):
  """Mean next-token cross-entropy (nats per token)."""
  drop = jax.random.bernoulli(rng, label_dropout, labels.shape)
  labels = jnp.where(drop, cfg.num_classes, labels)
  logits = M.forward(cfg, params, tokens, labels)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
  return jnp.mean(nll)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def train_step(cfg, state, batch):
  """One optimizer step. ``cfg`` must be hashable (ml_collections.FrozenConfigDict)."""
  rng, sub = jax.random.split(state.rng)
  loss, grads = jax.value_and_grad(
      lambda p: loss_fn(cfg, p, batch["tokens"], batch["label"], sub, cfg.label_dropout))(
          state.params)
  updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(loss=loss, grad_norm=optax.global_norm(grads))
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


@functools.partial(jax.jit, static_argnums=(0,))
def eval_nll(cfg, params, batch):
  """Held-out NLL per token with the true labels (no dropout)."""
  return loss_fn(cfg, params, batch["tokens"], batch["label"], jax.random.key(0), 0.0)
