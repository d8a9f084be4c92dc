#!/usr/bin/env bash
# What the GPU runs recorded in BENCHMARKS.md / RESULTS.md executed, stage by stage, on the device
# machine (its python3 has jax[cuda], torch; grain, ml_collections and fla come as wheels in .whl/).
#   bash benchmarks/gpu_session.sh STAGE...   stages: tests train sampling autotune profile topk scaling sad fla fixtures ops parts lina plina ncu ab flags xla sxla hlo
# Logs and JSON go to $OUT (default: ./out).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks
else
  export PYTHONPATH=$PWD:$PWD/benchmarks
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
# LASADGen-L's training step as BENCHMARKS.md times it (the ab, flags and xla stages)
L_STEP="--variants L --batches 256 --remat --remat-policy dots_attn_acts --no-scan --iters 8"
# The xla and sxla stages: the ';'-separated XLA_SETS as the array `sets`, with XLA's defaults
# (an empty set) first and last.
xla_sets() {
  IFS=';' read -ra sets <<< ";${XLA_SETS:?set XLA_SETS, e.g. '--xla_gpu_graph_min_graph_size=1'}"
  sets+=("")
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    # The 12 oracle cases alone took >200 s on the H100 (host-side float64 oracle); the fla test
    # autotunes for minutes. TESTS_K selects (e.g. "decode or (oracle and 32 and 1000)").
    tests)    timeout ${TESTS_TIMEOUT:-560} python3 -m pytest -q -s tests/test_gpu.py \
                -k "${TESTS_K:-not fla}" 2>&1 | tee "$OUT/test_gpu.log" ;;
    train)    XLA_PYTHON_CLIENT_MEM_FRACTION=.95 timeout 240 python3 benchmarks/train.py \
                --variants B,L --batches 256,128,64 ${TRAIN_ARGS:-} \
                --out "$OUT/train_h100${TRAIN_TAG:-}.json" 2>&1 | tee "$OUT/train${TRAIN_TAG:-}.log" ;;
    sampling) timeout ${SAMPLING_TIMEOUT:-150} python3 benchmarks/sampling.py --variant L \
                ${SAMPLING_ARGS:-} --out "$OUT/sampling_h100${SAMPLING_TAG:-}.json" 2>&1 | tee "$OUT/sampling${SAMPLING_TAG:-}.log" ;;
    # scripts/autotune_sampler.py for L's benchmark shape (8 images, CFG 4, top-k 2000), then the
    # sampler without / with its directory, alternating (BENCHMARKS.md session 32); the directory
    # stays in /tmp (hundreds of small files would exceed what a device call brings back).
    autotune) timeout 200 python3 scripts/autotune_sampler.py --config configs/lasad.py:L \
                --batch_size 8 --cfg_scale 4 --top_k 2000 --out /tmp/autotune_L 2>&1 \
                | tee "$OUT/autotune_sampler${SAMPLING_TAG:-}.log"
              for i in 1 2; do for tag in def at; do
                extra=""; [[ $tag == at ]] && extra="--autotune-dir /tmp/autotune_L"
                timeout ${SAMPLING_TIMEOUT:-150} python3 benchmarks/sampling.py --variant L \
                  --grids 16 --attentions lasad --repeats 3 ${SAMPLING_ARGS:-} $extra \
                  --out "$OUT/sampling_h100${SAMPLING_TAG:-}_autotune_${tag}_$i.json"
              done; done 2>&1 | tee "$OUT/sampling_autotune${SAMPLING_TAG:-}.log" ;;
    profile)  timeout ${PROFILE_TIMEOUT:-200} python3 benchmarks/profile_sampler.py ${PROFILE_ARGS:-} \
                --out "$OUT/profile_sampler_h100${PROFILE_TAG:-}.json" 2>&1 | tee "$OUT/profile${PROFILE_TAG:-}.log" ;;
    topk)     timeout ${TOPK_TIMEOUT:-150} python3 benchmarks/topk.py ${TOPK_ARGS:-} \
                --out "$OUT/topk_h100${TOPK_TAG:-}.json" 2>&1 | tee "$OUT/topk${TOPK_TAG:-}.log" ;;
    # Data-parallel scaling: the same per-GPU batch on 1 GPU and on all of them (nvidia-h200-x2).
    scaling)  ngpu=$(nvidia-smi -L | wc -l)
              for v in ${SCALE_VARIANTS:-L B}; do for nd in 1 $ngpu; do
                CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((nd - 1))) XLA_PYTHON_CLIENT_MEM_FRACTION=.95 \
                  timeout ${SCALE_TIMEOUT:-200} python3 benchmarks/train.py --variants $v \
                  --batches $((${SCALE_BATCH:-256} * nd)) --remat --iters ${SCALE_ITERS:-6} \
                  --out "$OUT/train_scaling_${v}_${nd}gpu.json" 2>&1 | tee -a "$OUT/scaling.log"
              done; done ;;
    sad)      timeout ${SAD_TIMEOUT:-560} python3 scripts/sad_ablation.py --out "$OUT/sad" \
                --datasets "${SAD_DATASETS:-digits,shapes,photos}" \
                --variants "${SAD_VARIANTS:-carry,reset,learned,none,softmax}" \
                --seeds "${SAD_SEEDS:-0,1,2}" 2>&1 | tee -a "$OUT/sad.log"
              tar czf "$OUT/sad.tgz" -C "$OUT" sad && rm -rf "$OUT/sad" ;;   # one file comes back
    fla)      timeout 560 python3 -m pytest -q -s tests/test_gpu.py -k fla 2>&1 | tee "$OUT/test_gpu_fla.log" ;;
    # tests/fixtures/fla_gla.npz with fla's chunk_gla cases (they need CUDA; fla autotunes for
    # minutes): copy $OUT/fla_gla.npz over the committed one, then run tests/test_parity.py.
    fixtures) timeout ${FIXTURES_TIMEOUT:-560} python3 scripts/make_parity_fixtures.py \
                --out "$OUT/fla_gla.npz" 2>&1 | tee "$OUT/fixtures.log" ;;
    ops)      timeout ${OPS_TIMEOUT:-560} python3 benchmarks/ops.py ${OPS_ARGS:-} \
                --out "$OUT/ops_h100.json" 2>&1 | tee "$OUT/ops.log" ;;
    parts)    timeout ${PARTS_TIMEOUT:-200} python3 benchmarks/ops_parts.py ${PARTS_ARGS:-} \
                2>&1 | tee "$OUT/ops_parts.log" ;;
    plina)    timeout ${PLINA_TIMEOUT:-300} python3 benchmarks/profile_lina.py ${PLINA_ARGS:-} \
                --out "$OUT/profile_lina_h100${PLINA_TAG:-}.json" 2>&1 | tee "$OUT/profile_lina${PLINA_TAG:-}.log" ;;
    lina)     timeout ${LINA_TIMEOUT:-330} python3 benchmarks/lina.py ${LINA_ARGS:-} \
                --out "$OUT/lina_h100${LINA_TAG:-}.json" 2>&1 | tee "$OUT/lina${LINA_TAG:-}.log" ;;
    # Nsight Compute on one launch of the kernels matching NCU_KERNEL (default lasad_fused), then
    # its per-instruction page summarised by ncu_sass.py (where the warps stall).
    ncu)      tag=${NCU_TAG:-fused}; rep="$OUT/ncu_$tag"
              timeout ${NCU_TIMEOUT:-240} /usr/local/cuda/bin/ncu --kernel-name "regex:${NCU_KERNEL:-lasad_fused}" \
                --launch-skip 1 --launch-count 1 --set full -f -o "$rep" \
                python3 benchmarks/kernel_once.py ${NCU_ARGS:-} > "$rep.log" 2>&1
              tail -5 "$rep.log"
              /usr/local/cuda/bin/ncu --import "$rep.ncu-rep" --page details >> "$rep.log" 2>&1
              /usr/local/cuda/bin/ncu --import "$rep.ncu-rep" --page source --csv --print-source sass \
                > "$rep.sass.csv" 2>> "$rep.log"
              python3 benchmarks/ncu_sass.py "$rep.sass.csv" 2>&1 | tee "$rep.sass.txt"
              gzip -f "$rep.sass.csv"; rm -f "$rep.ncu-rep" ;;
    # Old-vs-new L training step in one call, alternating: this tree and the tree in $OLD_TREE
    # (made before the call: git archive REV | tar -x -C DIR; untracked, so it travels), the
    # latter run with this tree's benchmarks/train.py. AB_ARGS go to this tree's runs only.
    ab)       A=$L_STEP
              cp benchmarks/train.py "$OLD_TREE/benchmarks/"
              for i in 1 ${AB_REPEAT:-}; do
                XLA_PYTHON_CLIENT_MEM_FRACTION=.95 timeout 120 python3 benchmarks/train.py $A \
                  ${AB_ARGS:-} --out "$OUT/ab_new_$i.json" 2>&1 | tee -a "$OUT/ab.log" | tail -1
                (cd "$OLD_TREE" && PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks XLA_PYTHON_CLIENT_MEM_FRACTION=.95 \
                  timeout 120 python3 benchmarks/train.py $A --out "$OUT/ab_old_$i.json") 2>&1 \
                  | tee -a "$OUT/ab.log" | tail -1
              done ;;
    # The same L training step with this tree's defaults and then each of the ';'-separated flag
    # sets in FLAG_SETS (e.g. FLAG_SETS="--kernel-save-states 1"), alternating, AB_REPEAT more
    # rounds. Each run appends to flags.log and writes flags_<round>_<set: 0 = defaults>.json.
    flags)    A=${STEP_ARGS:-$L_STEP}   # STEP_ARGS: another step, e.g. "--variants B --batches 512 ..."
              IFS=';' read -ra sets <<< ";${FLAG_SETS:?set FLAG_SETS, e.g. '--kernel-save-states 1'}"
              for i in 1 ${AB_REPEAT:-}; do for j in "${!sets[@]}"; do
                echo "flags: ${sets[$j]:-(defaults)}" | tee -a "$OUT/flags.log"
                XLA_PYTHON_CLIENT_MEM_FRACTION=.95 timeout 120 python3 benchmarks/train.py $A ${sets[$j]} \
                  --out "$OUT/flags_${i}_$j.json" 2>&1 | tee -a "$OUT/flags.log" | tail -1
              done; done ;;
    # The same L training step under each of the ';'-separated XLA_FLAGS values in XLA_SETS (the
    # first, empty, is XLA's defaults; e.g. XLA_SETS="--xla_gpu_enable_cublaslt=true"), then the
    # defaults again. Each run appends to xla.log and writes xla_<n>.json.
    xla)      A=$L_STEP
              xla_sets
              for j in "${!sets[@]}"; do
                echo "XLA_FLAGS=${sets[$j]}" | tee -a "$OUT/xla.log"
                XLA_FLAGS="${sets[$j]}" XLA_PYTHON_CLIENT_MEM_FRACTION=.95 timeout 120 python3 \
                  benchmarks/train.py $A --out "$OUT/xla_$j.json" 2>&1 | tee -a "$OUT/xla.log" | tail -1
              done ;;
    # LASADGen-L's sampler (8 images, CFG 4, top-k 2000, 16x16) under each of the ';'-separated
    # sets in XLA_SETS, the first and last runs with XLA's defaults (as the xla stage). A set is
    # XLA_FLAGS, optionally followed by '|' and benchmarks/sampling.py options for that run only
    # (e.g. XLA_SETS="--xla_gpu_graph_min_graph_size=1;|--scan-unroll 2"); sxla_<n>.json.
    sxla)     xla_sets
              for j in "${!sets[@]}"; do
                flags=${sets[$j]%%|*}; args=""; [[ ${sets[$j]} == *"|"* ]] && args=${sets[$j]#*|}
                echo "XLA_FLAGS=$flags ${args:+options: $args}" | tee -a "$OUT/sxla.log"
                XLA_FLAGS="$flags" timeout ${SAMPLING_TIMEOUT:-150} python3 benchmarks/sampling.py \
                  --variant L --grids 16 --attentions lasad --repeats 3 ${SAMPLING_ARGS:-} $args \
                  --out "$OUT/sampling_h100${SAMPLING_TAG:-}_sxla_$j.json" 2>&1 | tee -a "$OUT/sxla.log" \
                  | grep -E "^\((a|b|c)\)|rror"
              done ;;
    # The optimised HLO of the training step (to name the fusions a profile lists).
    hlo)      XLA_FLAGS="--xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=${HLO_RE:-.*step.*}" \
                XLA_PYTHON_CLIENT_MEM_FRACTION=.95 timeout 240 python3 benchmarks/train.py --variants L \
                --batches 256 --remat --iters 2 ${HLO_ARGS:-} --out "$OUT/hlo_train.json" 2>&1 | tail -3
              find "$OUT/hlo" -type f ! -name '*after_optimizations.txt' -delete
              tar czf "$OUT/hlo.tgz" -C "$OUT" hlo && rm -rf "$OUT/hlo" && ls -la "$OUT/hlo.tgz" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
