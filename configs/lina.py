"""LINA configs: ``configs/lina.py:d48w768`` etc. (LINA.md sizes), ``:tiny`` for CPU tests.

Every size: 16 class-encoder blocks + 32 image blocks (encoder/decoder split at 16) + 6 head blocks;
16-channel KL-16 latents on a 16 x 16 grid. The training fields (``with_training``) make the same
config usable by ``train.py``; ``configs/lina_digits.py`` is the CPU demo.
"""

import ml_collections

# name: (width, heads)
SIZES = {"tiny": (64, 4), "d48w768": (768, 12), "d48w1024": (1024, 16), "d48w1536": (1536, 16)}


def get_config(variant="d48w768"):
  variant = variant or "d48w768"
  if variant not in SIZES:
    raise ValueError(f"unknown LINA variant {variant!r}; choose one of {sorted(SIZES)}")
  d, h = SIZES[variant]
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.model = "lina"
  c.variant = variant
  c.dim, c.num_heads = d, h
  c.class_depth = 2 if tiny else 16
  c.image_depth = 4 if tiny else 32
  c.encoder_depth = 2 if tiny else 16
  c.head_depth = 2 if tiny else 6
  c.latent_channels = 1 if tiny else 16
  c.grid = (8, 8) if tiny else (16, 16)
  c.num_classes = 10 if tiny else 1000
  c.dtype = "float32" if tiny else "bfloat16"
  c.attention = "linear"        # linear (LINA) | softmax (baseline for speed comparisons)
  # lina_attention: auto (on a GPU pallas up to 2048 tokens, where it was faster on the H100,
  # else xla) | xla | split | pallas
  # (lasad_jax/lina/attention.py; all float32-accurate). The decoder's 5 x 5 depthwise conv:
  # auto (xla on a GPU, else shift) | shift (25 shifted multiply-adds) | flat (the same on the
  # raster token axis) | xla (lax.conv_general_dilated, grouped); inputs rounded to conv_dtype
  # (auto = the compute dtype, as LINA's autocast conv), float32 sums. On the H100 the GPU
  # choices were the fastest sampler (BENCHMARKS.md, session 6).
  c.attn_impl = "auto"
  c.conv_impl = "auto"
  c.conv_dtype = "auto"
  # Training objective (LINA.md "Training").
  c.loss_repeat = 4
  c.mask_ratio = ml_collections.ConfigDict(dict(min=0.7, max=1.0, mean=1.0, std=0.25))
  # Sampling (LINA.md "Sampling"; cfg_scale 2.4 is the 1.4B model's).
  c.sample = ml_collections.ConfigDict(dict(ar_steps=64, euler_steps=25, cfg_scale=2.4,
                                            num_per_class=4))
  # KL-16 VAE decoding latents to pixels (user-supplied path to MAR's kl16.ckpt; empty = none);
  # latents are divided by latent_scale before decoding (MAR's 0.2325; a guess for LINA).
  c.vae_checkpoint = ""
  c.vae_config = ml_collections.ConfigDict(dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                                                embed_dim=16))   # KLConfig fields: KL-16
  c.latent_scale = 0.2325
  return c
