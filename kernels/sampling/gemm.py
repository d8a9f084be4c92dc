"""The decode step's skinny matmuls, x [R, K] @ W [K, N] with R = a few rows, on Mosaic GPU.

A sampler's token step multiplies a handful of rows (8 images and their CFG twins: R = 16) by
each weight matrix, so its time is the time to stream W from HBM. XLA's split-K Triton GEMMs move
LASADGen-L's weights at 0.7-1.5 TB/s in the sampler (BENCHMARKS.md, session 12 profile). Here
each program streams its share of W through a TMA pipeline of ``stages`` shared-memory buffers
and multiplies on the tensor cores in the transposed form

    y^T [tn, R] += W^T [tn, tk] x^T [tk, R]

so that W is wgmma's 64-row operand (read as a transposed view of its [tk, tn] tile) and the few
rows of x are the narrow one (R a multiple of 8): no padding of x to 64 rows. The grid is
(N / tn column tiles, ``splits`` K segments); each program writes a float32 partial [tn, R] and
XLA sums the partials and transposes them, a pass it fuses into the consumer.

Runs in Mosaic GPU's interpreter off GPUs (how CI tests it).
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
  stages: int = 4     # TMA buffers in flight per program


def _transforms(minor, dtype):
  """Tiling and swizzle of a bf16 tile whose minor dimension holds ``minor`` elements."""
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
  if k % (cfg.tk * cfg.splits):
    raise ValueError(f"skinny_matmul: K={k} must be a multiple of tk x splits = "
                     f"{cfg.tk} x {cfg.splits}")


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
  tn, tk = cfg.tn, cfg.tk

  def kernel(x_gmem, w_gmem, o_gmem, o_smem):
    col = lax.axis_index("n")
    seg = lax.axis_index("s")

    def with_acc(acc):
      def step(_, w_smem, x_smem):
        plgpu.wgmma(acc, w_smem.transpose((1, 0)), x_smem.transpose((1, 0)))
        plgpu.wgmma_wait(1)   # one wgmma in flight: its buffers are released a step late

      plgpu.emit_pipeline(
          step, grid=(steps,), max_concurrent_steps=cfg.stages,
          in_specs=[plgpu.BlockSpec((tk, tn), lambda i: (seg * steps + i, col),
                                    transforms=_transforms(tn, w.dtype), delay_release=1),
                    plgpu.BlockSpec((r, tk), lambda i: (0, seg * steps + i),
                                    transforms=_transforms(tk, x.dtype), delay_release=1)],
      )(w_gmem, x_gmem)
      plgpu.wgmma_wait(0)
      o_smem[...] = acc[...]

    pl.run_scoped(with_acc, plgpu.ACC((tn, r), F32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[seg, pl.ds(col * tn, tn)])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((cfg.splits, n, r), F32),
      scratch_types=dict(o_smem=plgpu.SMEM((tn, r), F32)),
      grid=(n // tn, cfg.splits), grid_names=("n", "s"),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(x, w)


def skinny_matmul(x, w, cfg=GemmConfig(), *, interpret=None):
  """x [R, K] @ w [K, N] in float32 (bf16 / f16 operands); R a multiple of 8."""
  return jnp.sum(skinny_partials(x, w, cfg, interpret=interpret), axis=0).T
