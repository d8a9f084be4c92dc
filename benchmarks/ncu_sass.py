"""Summarise Nsight Compute's per-instruction (SASS) page: where a kernel's warps stall.

    ncu --kernel-name regex:lasad_fused --launch-count 1 --set full -o rep \
        python benchmarks/kernel_once.py
    ncu --import rep.ncu-rep --page source --csv --print-source sass > sass.csv
    python benchmarks/ncu_sass.py sass.csv [--top 40]

Groups the warp-stall samples (PC sampling) by opcode and by instruction class (tensor-core dots,
special functions, shared memory, barriers, global memory, ...) and lists the hottest
instructions, so a kernel's time can be tied to the operations that cause it.
"""

import argparse
import collections
import csv
import re

CLASSES = [("tensor core", r"^(HMMA|HGMMA|IMMA|WARPGROUP)"), ("special fn (exp, rcp)", r"^MUFU"),
           ("shared load/store", r"^(LDS|STS|LDSM|STSM)"), ("barrier / sync", r"^(BAR|WARPSYNC|DEPBAR)"),
           ("global load/store", r"^(LDG|STG|LD|ST|LDGSTS|UBLKCP|UTMA)"), ("shuffle", r"^SHFL"),
           ("conversion", r"^(F2F|F2FP|I2F|F2I|FRND)"), ("branch", r"^(BRA|BSSY|BSYNC|EXIT|CALL|RET)"),
           ("float math", r"^(FADD|FMUL|FFMA|FMNMX|FSETP|FSEL|HADD2|HMUL2|HFMA2|FCHK)"),
           ("integer / logic", r"^(IADD3|IMAD|LOP3|ISETP|SHF|LEA|SEL|MOV|PRMT|S2R|CS2R|IMNMX|P2R|R2P|PLOP3|VOTE|POPC|FLO|ULDC|U)")]


def _num(x):
  try:
    return float(str(x).replace(",", ""))
  except ValueError:
    return 0.0


def opcode(sass):
  s = re.sub(r"^@!?U?P\w+\s+", "", sass.strip())
  return s.split(" ")[0].split(".")[0] if s else "?"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("csv")
  ap.add_argument("--top", type=int, default=40)
  args = ap.parse_args()
  with open(args.csv, newline="") as f:
    lines = [ln for ln in f if ln.count(",") > 2]      # drop ncu's banner lines
  rows = list(csv.DictReader(lines))
  if not rows:
    raise SystemExit("no rows: is this the output of `ncu --page source --csv --print-source sass`?")
  cols = list(rows[0])
  print("columns:", cols)
  src = next(c for c in cols if c.strip().lower() in ("source", "sass"))
  samp = [c for c in cols if "Sampling" in c and "All" in c] or [c for c in cols if "Sampling" in c]
  if not samp:
    raise SystemExit(f"no stall-sampling column among {cols}")
  samp = samp[0]
  execd = next((c for c in cols if c.startswith("Instructions Executed")), None)
  total = sum(_num(r[samp]) for r in rows) or 1.0
  by_op, by_cls, n_exec = collections.Counter(), collections.Counter(), collections.Counter()
  for r in rows:
    op = opcode(r[src])
    by_op[op] += _num(r[samp])
    n_exec[op] += _num(r[execd]) if execd else 0
    cls = next((name for name, pat in CLASSES if re.match(pat, op)), "other")
    by_cls[cls] += _num(r[samp])
  print(f"{len(rows)} instructions, {total:.0f} stall samples ({samp})")
  print("\nby class:")
  for name, v in by_cls.most_common():
    print(f"  {name:<24} {100 * v / total:6.1f}%")
  print("\nby opcode (share of samples, warp-level instructions executed):")
  for op, v in by_op.most_common(30):
    print(f"  {op:<10} {100 * v / total:6.1f}%  {n_exec[op]:>14,.0f}")
  print(f"\nhottest {args.top} instructions:")
  hot = sorted(range(len(rows)), key=lambda i: -_num(rows[i][samp]))[:args.top]
  for i in sorted(hot):
    print(f"  {i:6d} {100 * _num(rows[i][samp]) / total:5.1f}%  {rows[i][src].strip()[:90]}")


if __name__ == "__main__":
  main()
