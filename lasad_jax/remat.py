"""Rematerialisation of a transformer block for the backward pass (``config.remat``,
``config.remat_policy``), shared by LASADGen and LINA.

``remat=False``: every block keeps its activations (fastest, most memory). ``remat=True`` with
``remat_policy``:

- ``"full"``: keep only the block input; the backward pass reruns the whole block.
- ``"dots"``: also keep the outputs of the matmuls against weights
  (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``) and the block output where the
  model names it ``"block_out"`` (the next block's input, kept anyway); the backward reruns only the
  elementwise work and the attention operator.
- ``"dots_attn"``: ``"dots"`` plus the attention output (tagged ``"attn_out"`` with
  ``checkpoint_name``), so the attention kernel's forward is not rerun either.
- ``"dots_attn_acts"``: ``"dots_attn"`` plus the matmuls' bf16 input activations that the model
  names (``"attn_in"``, ``"mlp_in"``: the normalised block inputs; ``"mlp_act"``: the SwiGLU
  product). The forward writes them anyway as matmul operands; keeping them spares the backward
  their recomputation (RMSNorms, the SwiGLU product) at more memory (LASADGen-L, batch 256,
  unrolled, one H100: 403.2 -> 396.7 ms per step, 49.2 -> 62.5 GiB; BENCHMARKS.md session 10).

With the layers in a ``lax.scan`` (``config.scan_layers``, default) the saved values are copied
into stacked [L, ...] buffers; unrolled layers avoid those copies (LASADGen-L on an H100 with
``dots_attn``: 427 -> 403 ms per step, BENCHMARKS.md session 9).
"""

import functools

import jax
from jax.ad_checkpoint import checkpoint_name  # noqa: F401  (re-exported for the models)

POLICIES = ("full", "dots", "dots_attn", "dots_attn_acts")
ACT_NAMES = ("attn_in", "mlp_in", "mlp_act")


def wrap(fn, cfg):
  """``fn`` wrapped per the config's remat fields (unchanged when ``cfg.remat`` is false)."""
  if not cfg.get("remat", False):
    return fn
  policy = cfg.get("remat_policy", "full")
  if policy not in POLICIES:
    raise ValueError(f"config.remat_policy must be one of {POLICIES}, got {policy!r}")
  cp = jax.checkpoint_policies
  # Inside lax.scan the recomputation cannot be merged with the forward, so CSE may stay on; with
  # unrolled layers (config.scan_layers=False) XLA would merge them and keep every activation
  # (63 GiB asked for LASADGen-L at batch 256 on an H100, session 9), so it is prevented there.
  ckpt = functools.partial(jax.checkpoint, prevent_cse=not cfg.get("scan_layers", True))
  if policy == "full":
    return ckpt(fn)
  # "block_out" (LASADGen: a block's output, read by the gradient of the norm after its residual
  # adds) is the next block's input, kept anyway: saving it costs no memory.
  names = ("block_out",)
  if policy != "dots":
    names += ("attn_out",) + (ACT_NAMES if policy == "dots_attn_acts" else ())
  return ckpt(fn, policy=cp.save_from_both_policies(
      cp.dots_with_no_batch_dims_saveable, cp.save_only_these_names(*names)))
