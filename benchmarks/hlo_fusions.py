"""Name what a training profile's kernels are: each profiled XLA fusion with its bytes and bandwidth.

    python benchmarks/hlo_fusions.py HLO_AFTER_OPTIMIZATIONS.txt PROFILE.json [--top 45]

HLO: the optimised module of the step (``bash benchmarks/gpu_session.sh hlo`` writes it, gzipped
in hlo.tgz). PROFILE: a ``benchmarks/train.py --profile N`` record (its "kernels"). For every
profiled kernel that is an XLA fusion it prints calls, total ms, us per call, bytes in + out of
one call (operands and results as declared, so a fusion that slices a large operand is
over-counted), the bandwidth that implies and the op's name in the jaxpr. A fusion far below the
copy bandwidth (~2.5-3 TB/s on the H100) is doing something other than streaming; session 11
found the global-norm reductions that way (BENCHMARKS.md). Custom calls (cuBLAS GEMMs, Pallas
kernels) print without HLO details.
"""

import argparse
import collections
import json
import re

BYTES = dict(bf16=2, f16=2, f32=4, s32=4, u32=4, s8=1, u8=1, pred=1)
ARRAY = r"(?:bf16|f16|f32|s32|u32|s8|u8|pred)\[[\d,]*\]"


def nbytes(shape):
  total = 0
  for dt, dims in re.findall(r"\b(bf16|f16|f32|s32|u32|s8|u8|pred)\[([\d,]*)\]", shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * BYTES[dt]
  return total


def fusions(hlo_text):
  """{instruction name: (dedup group, record)} for the entry computation's fusions."""
  entry = hlo_text[hlo_text.index("ENTRY"):]
  shapes, out = {}, {}
  for line in entry.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w-]+)\((.*?)\)(, .*)?$", line)
    if not m:
      continue
    name, shape, op, args, rest = m.groups()
    shapes[name] = shape
    if op != "fusion":
      continue
    b_in = 0
    for a in (a.strip() for a in args.split(",")):
      if not a.startswith("%"):
        continue
      nm, _, idx = a[1:].partition("#")
      sh = shapes.get(nm, "")
      if idx:   # element of a tuple-shaped operand
        parts = re.findall(ARRAY, sh)
        sh = parts[int(idx)] if int(idx) < len(parts) else ""
      b_in += nbytes(sh)
    rest = rest or ""
    dedup = re.search(r'deduplicated_name="([^"]+)"', rest)
    op_name = re.search(r'op_name="([^"]+)"', rest)
    out[name] = (dedup.group(1) if dedup else name,
                 dict(bytes=b_in + nbytes(shape), out=shape, op=op_name.group(1) if op_name else ""))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("hlo")
  ap.add_argument("profile")
  ap.add_argument("--top", type=int, default=45)
  args = ap.parse_args()
  table = fusions(open(args.hlo).read())
  groups = collections.Counter(g for g, _ in table.values())
  rec = json.load(open(args.profile))["records"][0]
  for kname, v in list(rec["kernels"].items())[:args.top]:
    hit = table.get(re.sub(r"_(\d+)$", r".\1", kname)) or table.get(kname)
    head = f"{kname:44s} {v['calls']:4d} {v['ms']:8.2f} ms"
    if not hit:
      print(head)
      continue
    group, r = hit
    per_ms = v["ms"] / v["calls"]
    gb = r["bytes"] / 1e9
    print(f"{head} {per_ms * 1e3:7.0f} us {gb:6.3f} GB {gb / per_ms:6.2f} TB/s "
          f"x{groups[group]:<3d} {r['op'][-55:]}  -> {r['out'][:80]}")


if __name__ == "__main__":
  main()
