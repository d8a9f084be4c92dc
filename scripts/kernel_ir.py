"""Print the Triton IR of LASADGen's attention kernels (gates in the kernels, named output norm,
value and all gradients), without source locations, as lowered for an H100 on any machine.

    python scripts/kernel_ir.py [--shape 32,256,16,64] [--out FILE]

Two trees' outputs compare byte for byte: a refactor that leaves them equal leaves the compiled
kernels as they were timed (session 25 checked its refactors against the timed commit so). It
stands in for JAX's GPU query, as tests/test_lowering.py does, and lowers with interpret=False.
"""

import argparse
import functools
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def kernel_asm(shape, block_sizes=None):
  """[Triton IR text of each pallas_call, in lowering order] for ``hgrn2_attention``'s value and
  gradients at ``shape`` = (B, T, H, D), bf16."""
  from jax._src.pallas.triton import pallas_call_registration as reg

  import kernels.lasad.pallas as kp
  from lasad_jax.ops import hgrn2_attention
  asm, orig = [], reg.lowering.lower_jaxpr_to_triton_module

  def capture(*a, **kw):
    out = orig(*a, **kw)
    asm.append(out.module.operation.get_asm(enable_debug_info=False))
    return out
  saved = (reg.gpu_info_lib.get_gpu_info, kp.hgrn2_pallas)
  reg.lowering.lower_jaxpr_to_triton_module = capture
  reg.gpu_info_lib.get_gpu_info = lambda: types.SimpleNamespace(compute_capability="9.0")
  kp.hgrn2_pallas = functools.partial(kp.hgrn2_pallas, interpret=False)
  try:
    b, t, h, d = shape
    kw = {} if block_sizes is None else dict(block_sizes=block_sizes)

    def loss(qr, f, v, lb):
      o, st = hgrn2_attention(qr, f, v, lb, width=16, prefix=1, boundary=jnp.full((h,), -0.5),
                              initial_state=jnp.zeros((b, h, d, d)), return_final_state=True,
                              impl="pallas", gate="kernel", norm_eps=1e-5, norm_save="attn_out",
                              **kw)
      return jnp.sum(o.astype(jnp.float32)) + jnp.sum(st)
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
        x, x, x, jax.ShapeDtypeStruct((h, d), jnp.float32)).lower(lowering_platforms=("cuda",))
  finally:
    reg.lowering.lower_jaxpr_to_triton_module = orig
    reg.gpu_info_lib.get_gpu_info, kp.hgrn2_pallas = saved
  return asm


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="32,256,16,64", help="B,T,H,D (B*H >= 512: fused backward)")
  ap.add_argument("--out", default=None, help="write here instead of standard output")
  args = ap.parse_args()
  text = "\n// =====\n".join(kernel_asm(tuple(int(x) for x in args.shape.split(","))))
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  else:
    print(text)


if __name__ == "__main__":
  main()
