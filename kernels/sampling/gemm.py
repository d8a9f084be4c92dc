"""The decode step's skinny matmuls, x [R, K] @ W [K, N] with R = a few rows, on Mosaic GPU.

A sampler's token step multiplies a handful of rows (8 images and their CFG twins: R = 16) by
each weight matrix, so its time is the time to stream W from HBM. Each program here streams its
share of W through ``stages`` shared-memory buffers filled by TMA and multiplies on the tensor
cores in the transposed form

    y^T [tn, R] += W^T [tn, tk] x^T [tk, R]

so that W is wgmma's 64-row operand (a transposed view of its [tk, tn] tile) and the few rows of
x the narrow one (R a multiple of 8): no padding of x to 64 rows. The grid is (N / tn column
tiles, ``splits`` K segments); each program writes a float32 partial [tn, R] and XLA sums the
partials and transposes them, a pass it fuses into the consumer. With ``pdl`` the first W tiles
are requested before ``griddepcontrol.wait`` (W does not depend on the kernel before), x after.

Not used by the sampler: on the H100 it is no faster than XLA's split-K GEMMs (BENCHMARKS.md,
session 16: 1.0-1.5 TB/s, the same ~3 us fixed cost per launch as every tiling of session 10's
Triton kernels; as a dependent chain of 24, with or without PDL, slower than XLA's). Kept as the
repository's Mosaic GPU kernel that CI runs in Mosaic GPU's interpreter off GPUs.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GemmConfig:
  tn: int = 64        # columns of W per program (wgmma's M: a multiple of 64)
  tk: int = 64        # K rows of W per pipeline step (64 bf16 = one 128-byte swizzle row of x)
  splits: int = 1     # K segments, one program each
  stages: int = 4     # TMA buffers of W in flight per program
  pdl: bool = True    # programmatic dependent launch: start loading W before the last kernel ends


def tile_transforms(minor, dtype):
  """Tiling and swizzle of a 16-bit tile whose minor dimension holds ``minor`` elements."""
  swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def check(r, k, n, cfg, dtype):
  """ValueError naming what does not fit ``cfg`` (shapes of x [r, k] and W [k, n])."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"skinny_matmul: x and w must be bf16 or f16, got {jnp.dtype(dtype)}")
  if r % 8 or r > 256:
    raise ValueError(f"skinny_matmul: rows of x must be a multiple of 8 up to 256, got {r}")
  if cfg.tn % 64 or n % cfg.tn:
    raise ValueError(f"skinny_matmul: N={n} must be a multiple of tn={cfg.tn} (itself of 64)")
  if cfg.stages > 32:
    raise ValueError(f"skinny_matmul: stages={cfg.stages} exceeds Mosaic GPU's 32 barriers")
  if k % (cfg.tk * cfg.splits):
    raise ValueError(f"skinny_matmul: K={k} must be a multiple of tk x splits = "
                     f"{cfg.tk} x {cfg.splits}")


def ring_step(acc, i, n, w_smem, w_bar, x_tile, refill):
  """Block i of n through a ring of TMA buffers w_smem [stages, tk, tn] (slot i % stages, one
  barrier each): wait for it, acc [tn, R] += W^T x^T with x_tile [R, tk], then refill(i + stages,
  slot) while blocks remain. The refill is issued after the wgmma has finished reading the slot."""
  stages = w_smem.shape[0]
  slot = lax.rem(i, stages)
  plgpu.barrier_wait(w_bar.at[slot])
  plgpu.wgmma(acc, w_smem.at[slot].transpose((1, 0)), x_tile.transpose((1, 0)))
  plgpu.wgmma_wait(0)

  @pl.when(i + stages < n)
  def _():
    refill(i + stages, slot)


def skinny_partials(x, w, cfg=GemmConfig(), *, interpret=None):
  """float32 partials [splits, N, R] with sum(partials, 0).T == x @ w."""
  r, k = x.shape
  n = w.shape[1]
  check(r, k, n, cfg, x.dtype)
  if w.dtype != x.dtype or w.shape[0] != k:
    raise ValueError(f"skinny_matmul: w must be [{k}, N] {x.dtype}, got {w.shape} {w.dtype}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  steps = k // cfg.tk // cfg.splits
  stages = min(cfg.stages, steps)
  tn, tk = cfg.tn, cfg.tk
  # jax 0.11.2's interpreter has no rule for griddepcontrol ("MLIR translation rule ... not found
  # for platform cpu")
  pdl = cfg.pdl and not interpret

  def kernel(x_gmem, w_gmem, o_gmem, w_smem, x_smem, o_smem, w_bar, x_bar):
    col, seg = lax.axis_index("n"), lax.axis_index("s")
    k0 = seg * steps * tk

    def load_w(i, slot):
      plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(k0 + i * tk, tk), pl.ds(col * tn, tn)],
                              w_smem.at[slot], w_bar.at[slot])

    # W does not depend on the kernel before this one: its first tiles are requested before
    # waiting for that kernel (programmatic dependent launch), x only after.
    for i in range(stages):
      load_w(i, i)
    if pdl:
      plgpu.griddepcontrol_launch_dependents()
      plgpu.griddepcontrol_wait()
    for i in range(steps):   # one barrier for all of x: Mosaic GPU allows 32 per group
      plgpu.copy_gmem_to_smem(x_gmem.at[:, pl.ds(k0 + i * tk, tk)], x_smem.at[i], x_bar)
    plgpu.barrier_wait(x_bar)

    def with_acc(acc):
      def step(i, carry):
        ring_step(acc, i, steps, w_smem, w_bar, x_smem.at[i], load_w)
        return carry

      lax.fori_loop(0, steps, step, 0)
      o_smem[...] = acc[...]

    pl.run_scoped(with_acc, plgpu.ACC((tn, r), F32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[seg, pl.ds(col * tn, tn)])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((cfg.splits, n, r), F32),
      scratch_types=dict(
          w_smem=plgpu.SMEM((stages, tk, tn), w.dtype, transforms=tile_transforms(tn, w.dtype)),
          x_smem=plgpu.SMEM((steps, r, tk), x.dtype, transforms=tile_transforms(tk, x.dtype)),
          o_smem=plgpu.SMEM((tn, r), F32),
          w_bar=plgpu.Barrier(num_barriers=stages), x_bar=plgpu.Barrier(num_arrivals=steps)),
      grid=(n // tn, cfg.splits), grid_names=("n", "s"),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(x, w)


def skinny_matmul(x, w, cfg=GemmConfig(), *, interpret=None):
  """x [R, K] @ w [K, N] in float32 (bf16 / f16 operands); R a multiple of 8."""
  return jnp.sum(skinny_partials(x, w, cfg, interpret=interpret), axis=0).T
