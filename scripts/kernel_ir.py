"""Print the Triton IR of LASADGen's attention kernels (gates in the kernels, named output norm,
value and all gradients), without source locations, as lowered for an H100 on any machine.

    python scripts/kernel_ir.py [--shape 32,256,16,64] [--out FILE] [--block-sizes bwd_sub=16,...]
    python scripts/kernel_ir.py --regs [--warps 4] [--block-sizes ...]
    python scripts/kernel_ir.py --sass [--warps 4] [--block-sizes ...]
    python scripts/kernel_ir.py --regs --maxnreg 168 [...]

``--regs``: compile each kernel's IR for sm_90 with the ``triton`` package (pip install
triton==3.6.0, the H100 machine's version; no GPU needed, it bundles ptxas) and print its
registers per thread and stack bytes (spills), as ``cuobjdump --dump-resource-usage`` reads
them from the cubin. Session 26 checked it against Nsight Compute on the H100: the fused
backward at session 26's defaults (32-row steps), 255 registers with spills, on both.

``--sass``: the same compile; each kernel's machine instructions counted once per opcode
(static counts: a loop body counts once). A proxy for instruction-level changes (e.g. how a
float32 value is split into bf16 parts) that can be compared without a GPU; only a GPU run says
whether one is faster.

``--maxnreg N``: compile with a cap of N registers per thread (Triton's ``maxnreg``, PTX
``.maxnreg``) and see what it spills. The kernels take all 255 at 4 warps, so an SM holds 2
programs; 168 would let it hold 3, 128 four. Pallas Triton has no such option, so this says only
what such a cap would cost in spills, not whether the GPU would run faster.

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
  modules, orig = [], reg.lowering.lower_jaxpr_to_triton_module

  def capture(*a, **kw):   # printed once lowered: a wrapper around this (kp._maxnreg_hook) may
    out = orig(*a, **kw)   # still add module attributes
    modules.append(out.module)
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
    asm = [m.operation.get_asm(enable_debug_info=False) for m in modules]
  finally:
    reg.lowering.lower_jaxpr_to_triton_module = orig
    reg.gpu_info_lib.get_gpu_info, kp.hgrn2_pallas = saved
  return asm


def block_sizes(spec):
  """``BlockSizes`` from "field=value,..." (ints, floats, True / False / None, else strings)."""
  from kernels.lasad.pallas import BlockSizes
  consts = {"True": True, "False": False, "None": None}
  fields = {}
  for item in filter(None, spec.split(",")):
    key, sep, val = item.partition("=")
    if not sep or key not in BlockSizes.__dataclass_fields__:
      raise SystemExit(f"--block-sizes: expected field=value with a BlockSizes field, got {item!r}")
    if val in consts:
      fields[key] = consts[val]
    else:
      try:
        fields[key] = int(val)
      except ValueError:
        try:
          fields[key] = float(val)
        except ValueError:
          fields[key] = val
  return BlockSizes(**fields) if fields else None


def _compile(ir, num_warps, num_stages, *dump_flags, maxnreg=None):
  """(kernel name, [cuobjdump output for each flag]) of Triton IR text compiled for sm_90, at most
  ``maxnreg`` registers per thread if given."""
  import re
  import subprocess
  import tempfile
  try:
    import triton
    from triton.backends.compiler import GPUTarget
  except ImportError:
    raise SystemExit("--regs / --sass need the triton package: pip install triton==3.6.0") from None
  name = re.search(r"tt\.func public @(\w+)", ir).group(1)
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, f"{name}.ttir")
    with open(src, "w") as f:
      f.write(ir)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages,
                                         maxnreg=maxnreg))
    cubin = os.path.join(tmp, f"{name}.cubin")
    with open(cubin, "wb") as f:
      f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return name, [subprocess.run([tool, flag, cubin], capture_output=True, text=True,
                                 check=True).stdout for flag in dump_flags]


def resource_usage(ir, num_warps, num_stages=2, maxnreg=None):
  """(kernel name, registers per thread, stack bytes) of Triton IR text compiled for sm_90 with
  ``num_warps`` and ``num_stages`` (BlockSizes' defaults: 4 and 2), ``maxnreg`` as ``_compile``."""
  import re
  name, [usage] = _compile(ir, num_warps, num_stages, "--dump-resource-usage", maxnreg=maxnreg)
  regs = re.search(r"REG:(\d+)", usage)
  stack = re.search(r"STACK:(\d+)", usage)
  return name, int(regs.group(1)), int(stack.group(1))


def opcode_counts(ir, num_warps, num_stages=2, maxnreg=None):
  """(kernel name, Counter of SASS opcodes) of Triton IR text compiled for sm_90: each
  instruction of the machine code counted once (static, so a loop body counts once however
  often it runs; Nsight Compute's per-instruction page gives the executed counts). Opcodes
  without their modifiers (``HMMA.16816.F32.BF16`` -> ``HMMA``); predicated ones included."""
  import collections
  import re
  name, [sass] = _compile(ir, num_warps, num_stages, "-sass", maxnreg=maxnreg)
  ops = collections.Counter()
  for line in sass.splitlines():
    m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", line)
    if m:
      ops[m.group(1)] += 1
  return name, ops


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="32,256,16,64", help="B,T,H,D (B*H >= 512: fused backward)")
  ap.add_argument("--out", default=None, help="write here instead of standard output")
  ap.add_argument("--block-sizes", default="", help="BlockSizes fields, e.g. bwd_sub=16")
  ap.add_argument("--regs", action="store_true",
                  help="registers and spill stack per kernel (needs the triton package)")
  ap.add_argument("--sass", action="store_true",
                  help="static SASS instruction count per kernel and its most common opcodes "
                       "(needs the triton package)")
  ap.add_argument("--warps", type=int, default=4, help="with --regs / --sass: warps per program")
  ap.add_argument("--stages", type=int, default=2, help="with --regs / --sass: Triton num_stages")
  ap.add_argument("--maxnreg", type=int, default=None,
                  help="with --regs / --sass: at most this many registers per thread (what would "
                       "it spill?)")
  args = ap.parse_args()
  if args.maxnreg is not None and not (args.regs or args.sass):
    ap.error("--maxnreg applies to the --regs / --sass compile; add one of them")
  from kernels.lasad.pallas import MAXNREG_RANGE
  if args.maxnreg is not None and args.maxnreg not in MAXNREG_RANGE:
    ap.error(f"--maxnreg must be within {MAXNREG_RANGE.start}..{MAXNREG_RANGE.stop - 1} "
             f"(registers per thread), got {args.maxnreg}")
  asm = kernel_asm(tuple(int(x) for x in args.shape.split(",")), block_sizes(args.block_sizes))
  if args.regs or args.sass:   # either or both, per kernel
    for ir in asm:
      if args.regs:
        name, regs, stack = resource_usage(ir, args.warps, args.stages, args.maxnreg)
        print(f"{name:<24} {regs:4d} registers  {stack:5d} stack bytes")
      if args.sass:
        name, ops = opcode_counts(ir, args.warps, args.stages, args.maxnreg)
        top = "  ".join(f"{op} {n}" for op, n in ops.most_common(12))
        print(f"{name:<24} {sum(ops.values()):6d} instructions  {top}")
    return
  text = "\n// =====\n".join(asm)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  else:
    print(text)


if __name__ == "__main__":
  main()
