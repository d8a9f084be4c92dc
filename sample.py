"""Sample class-conditional images from a LASADGen (token grids) or LINA (latents) checkpoint.

    python sample.py --config configs/lasad.py:B --checkpoint DIR --classes 207,360 \
        --num-per-class 4 --cfg-scale 4.0 --top-k 2000 --out samples/
    python sample.py --config configs/lasad.py:tiny --random-init --out /tmp/s   # smoke test

    python sample.py --checkpoint runs/digits --out runs/digits/samples   # a train.py workdir

Writes ``tokens.npz`` (``tokens`` int32 [N, h, w], ``labels`` [N]) and ``tokens.png`` (the token
maps as grey levels). Where the config's dataset renders tokens (digits, shapes, photos) it also
writes ``images.npz`` (``arr_0`` uint8 [N, h, w, 3], the ADM evaluator's format) and ``images.png``;
so do configs that name a VQ tokenizer checkpoint (``config.vq_checkpoint``, LlamaGen's
``vq_ds16_c2i.pt``; ``config.vq_config`` holds the ``VQConfig`` fields, VQ-16 by default), decoding the codes to
pixels (``--config.vq_checkpoint=/path/vq_ds16_c2i.pt``). ``--checkpoint`` is a ``train.py`` workdir
(latest checkpoint; its ``config.json`` is used unless ``--config`` is given) or an Orbax directory
of the parameter dict; without it the script refuses unless ``--random-init`` is given.

LINA configs (``--config configs/lina.py:d48w768``, ``configs/lina_digits.py`` or a LINA workdir)
write ``latents.npz`` (``latents`` [N, h, w, C], ``labels``) and, where pixels can be made (the
digits demo, or ``config.vae_checkpoint`` naming MAR's ``kl16.ckpt``), ``images.npz`` + ``images.png``;
``--cfg-scale`` defaults to the config's, ``--ar-steps`` / ``--euler-steps`` to 64 / 25.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags
from PIL import Image

from lasad_jax import model as M
from lasad_jax import sampling as S
from lasad_jax.cli import dashes_to_underscores, define_sampling_flags
from lasad_jax.convert import load_params

_CONFIG = config_flags.DEFINE_config_file("config", "configs/lasad.py:tiny", "model config")
flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory of the parameters")
flags.DEFINE_bool("random_init", False, "sample from random weights (for smoke tests)")
flags.DEFINE_string("classes", "0,1,2,3", "comma-separated class ids")
flags.DEFINE_integer("num_per_class", 2, "images per class")
define_sampling_flags("images per compiled batch (the last one is padded)")
flags.DEFINE_integer("seed", 0, "PRNG seed: the same seed gives the same images")
flags.DEFINE_string("out", "samples", "output directory")
flags.DEFINE_string("autotune_dir", None, "LASADGen: XLA GPU autotuning results to compile the "
                    "sampler with (made by scripts/autotune_sampler.py for the same config, batch "
                    "and guidance)")
flags.DEFINE_integer("ar_steps", None, "LINA: masked-AR steps (default: the config's, 64)")
flags.DEFINE_integer("euler_steps", None, "LINA: Euler steps per AR step (default: 25)")
FLAGS = flags.FLAGS


def load_model(cfg, checkpoint, random_init):
  model = M.LASADGen(cfg, rngs=nnx.Rngs(0))
  if checkpoint is None:
    if not random_init:
      raise app.UsageError("--checkpoint DIR is required (an Orbax directory of the parameters); "
                           "pass --random-init to sample from random weights instead.")
    return model
  from lasad_jax.checkpointing import restore_params
  path = os.path.abspath(checkpoint)
  if not os.path.isdir(path):
    raise app.UsageError(f"--checkpoint {checkpoint!r} is not a directory")
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model.params())
  try:
    params, step = restore_params(path, target)
  except FileNotFoundError as e:
    raise app.UsageError(str(e))
  print(f"loaded {path}" + (f" (step {step})" if step is not None else ""), file=sys.stderr)
  return load_params(model, params)


def config_from(checkpoint):
  """The config a train.py workdir was trained with (its config.json), or None."""
  import json

  import ml_collections
  path = os.path.join(checkpoint or "", "config.json")
  if not checkpoint or not os.path.exists(path):
    return None
  with open(path) as f:
    c = json.load(f)
  c["grid"] = tuple(c["grid"])
  return ml_collections.ConfigDict(c)


def token_grid_png(tokens, vocab, path, cols=8):
  """Token maps [N, h, w] as a grey-level grid (token id / vocab)."""
  n, h, w = tokens.shape
  rows = -(-n // cols)
  img = np.zeros((rows * (h + 1), min(n, cols) * (w + 1)), np.uint8)
  for i, t in enumerate(tokens):
    r, c = divmod(i, cols)
    img[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = (255 * t / max(vocab - 1, 1))
  Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(path)


def vq_decode(cfg, tokens, batch_size):
  """Token grids -> uint8 RGB through the VQ tokenizer named by ``cfg.vq_checkpoint`` (LlamaGen's
  ``vq_ds16_c2i.pt`` or a .safetensors; read without running pickled code), in batches."""
  from lasad_jax.tokenizer import vq as V
  if not os.path.exists(cfg.vq_checkpoint):
    raise app.UsageError(f"config.vq_checkpoint={cfg.vq_checkpoint!r} does not exist (download "
                         f"LlamaGen's vq_ds16_c2i.pt yourself; nothing is fetched at run time)")
  vq = V.load(cfg.vq_checkpoint, cfg.get("vq_config", None))
  if int(tokens.max()) >= vq.config.codebook_size:
    raise app.UsageError(f"tokens reach {int(tokens.max())} but the VQ codebook has "
                         f"{vq.config.codebook_size} entries: config.vocab_size must match it")
  out = []
  for i in range(0, len(tokens), batch_size):
    x = np.asarray(vq.decode(tokens[i:i + batch_size]))
    out.append(np.clip(np.rint((np.clip(x, -1, 1) + 1) * 127.5), 0, 255).astype(np.uint8))
  return np.concatenate(out)


def lina_params(cfg, checkpoint, random_init):
  """LINA parameters: the EMA of a train.py run where it kept one, else its parameters."""
  from lasad_jax.lina import model as LM
  params = LM.init_params(cfg, jax.random.key(0))
  if checkpoint is None:
    if not random_init:
      raise app.UsageError("--checkpoint DIR is required (a train.py workdir or an Orbax directory "
                           "of the parameters); pass --random-init to sample from random weights.")
    return params
  from lasad_jax.checkpointing import restore_params
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  for item in ("ema", "params"):
    try:
      params, step = restore_params(os.path.abspath(checkpoint), target, item=item)
    except FileNotFoundError as e:
      err = e
      continue
    print(f"loaded {item} of {checkpoint}" + (f" (step {step})" if step is not None else ""),
          file=sys.stderr)
    return params
  raise app.UsageError(str(err))


def lina_main(cfg, classes):
  """LINA: latents by masked AR + flow matching; pixels where the data renders them."""
  import ml_collections

  from lasad_jax.lina import flow as LF
  from lasad_jax.lina import objective as LO
  cfg = ml_collections.FrozenConfigDict(cfg)   # hashable: a static argument of the sampler
  params = lina_params(cfg, FLAGS.checkpoint, FLAGS.random_init)
  scale = FLAGS.cfg_scale if FLAGS["cfg_scale"].present else cfg.sample.cfg_scale
  labels = np.repeat(np.asarray(classes, np.int32), FLAGS.num_per_class)
  if labels.max() >= cfg.num_classes:
    raise app.UsageError(f"--classes must be in [0, {cfg.num_classes}) for LINA")
  bs = FLAGS.batch_size
  n_batches = -(-len(labels) // bs)
  out, t0, key = [], time.time(), jax.random.key(FLAGS.seed)
  for i in range(n_batches):
    chunk = labels[i * bs:(i + 1) * bs]
    padded = np.pad(chunk, (0, bs - len(chunk)), constant_values=chunk[-1]) if n_batches > 1 \
        else chunk
    try:
      lat = LF.sample(cfg, params, padded, rng=jax.random.fold_in(key, i), cfg_scale=scale,
                      ar_steps=FLAGS.ar_steps, euler_steps=FLAGS.euler_steps)
    except ValueError as e:
      raise app.UsageError(str(e))
    out.append(np.asarray(lat)[:len(chunk)])
    print(f"\rbatch {i + 1}/{n_batches}  {time.time() - t0:.1f}s elapsed", end="",
          file=sys.stderr, flush=True)
  print(file=sys.stderr)
  latents = np.concatenate(out)
  h, w = cfg.grid
  os.makedirs(FLAGS.out, exist_ok=True)
  np.savez(os.path.join(FLAGS.out, "latents.npz"), latents=latents.reshape(len(labels), h, w, -1),
           labels=labels)
  print(f"wrote {len(labels)} latent grids ({h}x{w}x{cfg.latent_channels}) to "
        f"{FLAGS.out}/latents.npz")
  from lasad_jax import data as D
  pixels = None
  if cfg.get("vae_checkpoint"):
    from lasad_jax.tokenizer import kl
    pixels = kl.decode_to_uint8(cfg, latents, FLAGS.batch_size)
  elif cfg.get("data") and cfg.latent_channels == 1:
    pixels = D.to_pixels(cfg, LO.to_tokens(cfg, latents).reshape(len(labels), h, w))
  if pixels is not None:
    np.savez(os.path.join(FLAGS.out, "images.npz"), pixels)   # arr_0: ADM evaluator format
    D.save_image_grid(pixels, os.path.join(FLAGS.out, "images.png"), cols=FLAGS.num_per_class)
    print(f"wrote {len(pixels)} images to {FLAGS.out}/images.npz, images.png")


def main(argv):
  del argv
  cfg = _CONFIG.value
  if not FLAGS["config"].present and config_from(FLAGS.checkpoint) is not None:
    cfg = config_from(FLAGS.checkpoint)
  try:
    classes = [int(c) for c in FLAGS.classes.split(",") if c.strip()]
  except ValueError:
    raise app.UsageError(f"--classes must be comma-separated ints, got {FLAGS.classes!r}")
  bad = [c for c in classes if not 0 <= c <= cfg.num_classes]
  if bad or not classes:
    raise app.UsageError(f"--classes must be in [0, {cfg.num_classes}] ({cfg.num_classes} = null "
                         f"class), got {FLAGS.classes!r}")
  if cfg.get("model", "lasad") == "lina":
    if FLAGS.autotune_dir:
      raise app.UsageError("--autotune_dir applies to LASADGen's sampler, not LINA's")
    return lina_main(cfg, classes)
  height = FLAGS.height or cfg.grid[0]
  width = FLAGS.width or cfg.grid[1]
  model = load_model(cfg, FLAGS.checkpoint, FLAGS.random_init)
  labels = np.repeat(np.asarray(classes, np.int32), FLAGS.num_per_class)
  bs = FLAGS.batch_size
  n_batches = -(-len(labels) // bs)
  out, t0 = [], time.time()
  key = jax.random.key(FLAGS.seed)
  for i in range(n_batches):
    chunk = labels[i * bs:(i + 1) * bs]
    padded = np.pad(chunk, (0, bs - len(chunk)), constant_values=chunk[-1]) if n_batches > 1 \
        else chunk
    try:
      toks = S.sample(model, jnp.asarray(padded), height=height, width=width,
                      rng=jax.random.fold_in(key, i), cfg_scale=FLAGS.cfg_scale,
                      temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                      autotune_dir=FLAGS.autotune_dir)
    except ValueError as e:
      raise app.UsageError(str(e))
    out.append(np.asarray(toks)[:len(chunk)])
    done = i + 1
    eta = (time.time() - t0) / done * (n_batches - done)
    print(f"\rbatch {done}/{n_batches}  {(time.time() - t0):.1f}s elapsed  ETA {eta:.1f}s",
          end="", file=sys.stderr, flush=True)
  print(file=sys.stderr)
  tokens = np.concatenate(out).reshape(len(labels), height, width)
  os.makedirs(FLAGS.out, exist_ok=True)
  np.savez(os.path.join(FLAGS.out, "tokens.npz"), tokens=tokens, labels=labels)
  token_grid_png(tokens, cfg.vocab_size, os.path.join(FLAGS.out, "tokens.png"))
  print(f"wrote {len(labels)} token grids ({height}x{width}) to {FLAGS.out}/tokens.npz, tokens.png")
  from lasad_jax import data as D
  pixels = None
  if cfg.get("vq_checkpoint"):
    pixels = vq_decode(cfg, tokens, FLAGS.batch_size)
  elif cfg.get("data"):
    pixels = D.to_pixels(cfg, tokens)
  if pixels is not None:
    np.savez(os.path.join(FLAGS.out, "images.npz"), pixels)   # arr_0: ADM evaluator format
    D.save_image_grid(pixels, os.path.join(FLAGS.out, "images.png"), cols=FLAGS.num_per_class)
    print(f"wrote {len(pixels)} images to {FLAGS.out}/images.npz, images.png")


if __name__ == "__main__":
  app.run(main, argv=dashes_to_underscores(sys.argv))
