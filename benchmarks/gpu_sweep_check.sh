#!/usr/bin/env bash
# One prepared check of the sweep itself on a GPU (issue 19): `ikd-sweep run` through Ray Tune
# with MLflow (SQLite), once per packing of 1, 2 and 4 trials per GPU (resources.gpu 1, 0.5,
# 0.25), on real SST-2 with random-init BERT-base-shaped models (teacher 12 x 768, student
# 6 x 768, on a WordPiece vocabulary trained on SST-2: nothing from the hub); plus where a
# trial's time goes (`ikd-sweep train`, kd, on the same data).
#
#   benchmarks/gpu_sweep_check.sh [GLUE_DIR]    # GLUE_DIR (or $GLUE_DIR, default .glue): SST-2/
#   SMALL=1 DEVICE=cpu benchmarks/gpu_sweep_check.sh ../shared/data/glue   # CPU smoke (minutes)
#   ROWS=4000 PACKS="1 4" DEADLINE=230 CAP_1=120 CAP_4=80 benchmarks/gpu_sweep_check.sh .glue  # shorter
#   EXPERIMENTS=0 ...    # leave out benchmarks/gpu_gap_experiments.py (run last, if time is left)
#   SL=2 EPOCHS=2 LOG_EVERY=500 METHODS="kd" ...   # student layers, epochs, logging, methods
#
# If .whl/ exists at the repo root (benchmarks/make_gpu_wheels.sh: Ray without its Java jar,
# MLflow's tracking client and SQLite store, pydantic, datasets and the small pieces the GPU
# image lacks), it is installed into /tmp/site first. Prints per packing the sweep's aggregate
# student samples/s, the trials' GPU memory peak, the sweep's wall time and the time shares
# (benchmarks/sweep_figures.py defines them), a kd trial's steady state in each sweep and alone
# in a fresh process whose teacher is cached (`trial_samples_per_s.sweep_pack_k`,
# `.standalone_cold`, `startup_s.*`, `threads.*`; ikd's under `by_method.ikd`), and the gap
# experiments' figures (`experiments`), as JSON on stdout's last line and in
# $OUT/gpu_sweep_check.json, with everything printed in $OUT/gpu_sweep_check.txt (if $OUT is set).
# Exit status 0 only if every trial of every packing finished.
#
# On CPU (DEVICE=cpu) Ray sees no GPU: packing k means k trials sharing the machine's cores
# (resources.cpu = cores / k, gpu 0, max_concurrent_trials k), through the same code path.
# SMALL=1: tiny models and data, packings 1 and 2 (a smoke test of the whole path, not a figure).
set -uo pipefail
cd "$(dirname "$0")/.."
GLUE=$(realpath "${1:-${GLUE_DIR:-.glue}}")
OUTDIR=${OUT:-/tmp/gpu_sweep_check_out}
WORK=$(mktemp -d /tmp/gpu_sweep_check.XXXX)
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
PY=${PYTHON:-python3}
# Seconds: each step gets what is left of it, so the GPU run ends in time (SMALL: no limit).
DEADLINE=${DEADLINE:-$([ "$SMALL" = 1 ] && echo 3600 || echo 450)}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_sweep_check.txt") 2>&1
T0=$(date +%s)
stamp() { echo; echo "=== $* (+$(( $(date +%s) - T0 )) s)"; }
left() { local n=$(( DEADLINE - ($(date +%s) - T0) )); echo $(( n > 10 ? n : 10 )); }
# Run "$@" for at most $1 seconds (or what is left); SIGINT first, so a sweep saves its state
# and shuts its Ray down, as after Ctrl-C.
capped() { local c=$1 l; l=$(left); shift; timeout -s INT -k 30 $(( c < l ? c : l )) "$@"; }

if [ -d .whl ] && [ "${SKIP_WHL:-0}" != 1 ]; then  # SKIP_WHL=1: use the local env
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export IKD_SWEEP_HOME=$WORK/home
unset MLFLOW_TRACKING_URI
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=  # the same on a machine with a GPU
stamp "setup: device $DEVICE, GLUE $GLUE, small $SMALL, work $WORK"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -c "import sys, torch; from importlib.metadata import version as v; print('python', sys.version.split()[0], *(f'{n} {v(n)}' for n in ('torch', 'transformers', 'ray', 'mlflow-skinny', 'pyarrow', 'datasets', 'huggingface-hub', 'protobuf')), 'cuda', torch.cuda.is_available())" || exit 1

if [ "$SMALL" = 1 ]; then
  HIDDEN=64; HEADS=2; TL=2; SL=${SL:-1}; VOCAB=2000; ROWS=400; EVAL=100; LEN=32
  EPOCHS=${EPOCHS:-1}; PACKS=${PACKS:-"1 2"}; TEMPS="[2]"; LR=1.0e-3
  declare -A CAP=([train]=3600 [1]=3600 [2]=3600 [gap]=600)
  GAP_ARGS=(--ops 2000 --reports 10 --ckpt-mib 4 --log-every 5 100)
else
  HIDDEN=768; HEADS=12; TL=12; SL=${SL:-6}; VOCAB=8000; ROWS=${ROWS:-16000}; EVAL=872; LEN=128
  EPOCHS=${EPOCHS:-1}; PACKS=${PACKS:-"1 2 4"}; TEMPS="[2, 4]"; LR=1.0e-4
  declare -A CAP=([train]=${CAP_TRAIN:-100} [1]=${CAP_1:-150} [2]=${CAP_2:-110} [4]=${CAP_4:-100} [gap]=${CAP_GAP:-300})  # s per step, in DEADLINE
  GAP_ARGS=()
fi
CORES=$($PY -c "import os; print(len(os.sched_getaffinity(0)))")  # nproc obeys OMP_NUM_THREADS

stamp "tokenizer and model config from SST-2 train"
$PY benchmarks/sst2_tokenizer.py "$GLUE" "$WORK/tok" --hidden $HIDDEN --layers $TL \
  --heads $HEADS --vocab $VOCAB || exit 1

sweep_file() {  # $1: packing k -> a sweep file for k trials per device
  local k=$1 res
  if [ "$DEVICE" = cpu ]; then
    res="resources: {cpu: $($PY -c "print($CORES / $k)"), gpu: 0}
max_concurrent_trials: $k"
  else
    res="resources: {cpu: 2, gpu: $($PY -c "print(1 / $k)")}"
  fi
  cat > "$WORK/pack_$k.yaml" <<YEOF
name: sweepcheck-pack$k
tasks: [sst2]
methods: [${METHODS:-kd, ikd}]
data: {source: glue_dir, glue_dir: $GLUE, max_length: $LEN, max_train_samples: $ROWS,
       max_eval_samples: $EVAL}
teacher: {model: $WORK/tok, init: random, config: {num_hidden_layers: $TL}, epochs: 1,
          lr: $LR, batch_size: 32}
student: {model: $WORK/tok, init: random, config: {num_hidden_layers: $SL}}
train: {epochs: $EPOCHS, batch_size: 32, lr: $LR, log_every: ${LOG_EVERY:-50}}
ikd: {estimator: finite_difference, lookahead: sgd, order: student_first}
search: {temperature: $TEMPS, exam_every: [5], teacher_lr: [1.0e-5], seeds: [1]}
$res
max_failures: 0
YEOF
}
for k in $PACKS; do sweep_file "$k"; done
FIRST=$(echo $PACKS | cut -d' ' -f1)

# The metrics.jsonl of the latest `ikd-sweep train --method $1`, kept as standalone figure $2.
keep_log() {
  local log; log=$(ls -t "$WORK"/home/single/*/*-"$1"-*/metrics.jsonl 2>/dev/null | head -n 1)
  [ -n "$log" ] && cp "$log" "$WORK/train_$2.jsonl" && FIG+=(--standalone "$2=$WORK/train_$2.jsonl")
}
FIG=(--tracking-uri "sqlite:///$WORK/home/mlflow.db" --sweep-file "$WORK/pack_$FIRST.yaml")
if [ "$SMALL" != 1 ]; then  # (SMALL: the first sweep's first trial fine-tunes the teacher)
  # The kd trial alone: where its time goes; it also fine-tunes the teacher and caches the data
  # and the kd logits, so that the sweeps below measure trials, not the first trial's set-up.
  stamp "ikd-sweep train --method kd (time shares; caches the teacher for the sweeps)"
  capped "${CAP[train]}" $PY -m ikd_sweep.cli train "$WORK/pack_$FIRST.yaml" --task sst2 \
    --method kd --device "$DEVICE" --no-track > "$WORK/train_kd.json" 2> "$WORK/train_kd.err"
  echo "exit $?"; tail -n 3 "$WORK/train_kd.err"
  FIG+=(--train "kd=$WORK/train_kd.json")
  keep_log kd warm
fi
for k in $PACKS; do
  stamp "ikd-sweep run: packing $k trials per $DEVICE device"
  grep -E "^(resources|max_concurrent)" "$WORK/pack_$k.yaml"
  t=$(date +%s.%N)
  capped "${CAP[$k]:-150}" $PY -m ikd_sweep.cli run "$WORK/pack_$k.yaml" < /dev/null 2>&1 \
    | grep -vE "^\s*$" | tail -n 25
  echo "exit ${PIPESTATUS[0]}"
  FIG+=(--sweep "pack_$k=sweepcheck-pack$k" --wall "pack_$k=$($PY -c "import time; print(round(time.time() - $t, 1))")")
done

# The kd trial alone in a fresh process, its teacher, data and logits cached (as a sweep's
# trial finds them): the steady state a trial in the sweep is compared with.
stamp "ikd-sweep train --method kd, a cold process (teacher cached)"
capped "${CAP[train]}" $PY -m ikd_sweep.cli train "$WORK/pack_$FIRST.yaml" --task sst2 \
  --method kd --device "$DEVICE" --no-track > "$WORK/train_kd_cold.json" 2> "$WORK/train_kd_cold.err"
echo "exit $?"; tail -n 3 "$WORK/train_kd_cold.err"
keep_log kd cold

if [ "$SMALL" != 1 ] && [ "$(left)" -gt 90 ]; then  # the ikd trial alone, if time is left
  stamp "ikd-sweep train --method ikd (time shares)"
  capped "${CAP[train]}" $PY -m ikd_sweep.cli train "$WORK/pack_$FIRST.yaml" --task sst2 \
    --method ikd --device "$DEVICE" --no-track > "$WORK/train_ikd.json" 2> "$WORK/train_ikd.err"
  echo "exit $?"; tail -n 3 "$WORK/train_ikd.err"
  FIG+=(--train "ikd=$WORK/train_ikd.json")
  keep_log ikd ikd
fi

if [ "${EXPERIMENTS:-1}" = 1 ] && [ "$(left)" -gt 60 ]; then
  stamp "gap experiments (benchmarks/gpu_gap_experiments.py)"
  capped "${CAP[gap]}" $PY benchmarks/gpu_gap_experiments.py --device "$DEVICE" \
    --sweep-file "$WORK/pack_$FIRST.yaml" --home "$WORK/home" --out "$WORK/gap.json" \
    "${GAP_ARGS[@]}" 2> "$WORK/gap.err"
  echo "exit $?"; tail -n 3 "$WORK/gap.err"
  FIG+=(--experiments "$WORK/gap.json")
fi

stamp "figures (sweep_samples_per_s: student training samples / sweep span)"
$PY benchmarks/sweep_figures.py "${FIG[@]}" --out "$OUTDIR/gpu_sweep_check.json" \
  > "$WORK/figures.json"
rc=$?
[ $rc = 0 ] && $PY -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['all_finished'] else 1)" "$WORK/figures.json"
rc=$?
stamp "done: $([ $rc = 0 ] && echo 'every trial finished' || echo 'NOT every trial finished')"
cat "$WORK/figures.json"  # the last line: the figures as one JSON object
exit $rc
