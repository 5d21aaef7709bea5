#!/usr/bin/env bash
# One prepared GPU check (issue 10): speed and memory at BERT-base size, then one short kd and
# one short ikd trial through `ikd-sweep train` on real SST-2 with random-init small models.
#
#   benchmarks/gpu_check.sh [GLUE_DIR]      # GLUE_DIR (or $GLUE_DIR): has SST-2/{train,dev}.tsv
#   SMALL=1 DEVICE=cpu benchmarks/gpu_check.sh ../shared/data/glue   # CPU smoke test (minutes)
#
# Needs torch, transformers, numpy, pandas, pyarrow, scikit-learn, typer, rich, pyyaml; if a
# folder .whl/ exists at the repo root (pydantic, datasets and their small deps as wheels), they
# are installed into /tmp/site first. Nothing from the hub: the trials train their own WordPiece
# tokenizer on the SST-2 training file. Ray and MLflow are blocked on purpose (`ikd-sweep train`
# must not need them). Everything printed is also written to $OUT/gpu_check.txt (if $OUT is set),
# with bench.json, kd.json and ikd.json beside it. Exit status 0 only if both trials learn.
set -uo pipefail
cd "$(dirname "$0")/.."
GLUE=$(realpath "${1:-${GLUE_DIR:-../shared/data/glue}}")
OUTDIR=${OUT:-/tmp/gpu_check_out}
WORK=$(mktemp -d /tmp/gpu_check.XXXX)
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_check.txt") 2>&1
T0=$(date +%s)
stamp() { echo; echo "=== $* (+$(( $(date +%s) - T0 )) s)"; }

if [ -d .whl ] && [ "${SKIP_WHL:-0}" != 1 ]; then  # SKIP_WHL=1: use the local env
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# Block Ray and MLflow for every python below: the trainer and `ikd-sweep train` run without.
mkdir -p "$WORK/noheavy"
cat > "$WORK/noheavy/sitecustomize.py" <<'PYEOF'
import importlib.util, sys
# Only where they are installed (here, for the smoke test): a blocked find_spec raises, and
# libraries that probe for MLflow (accelerate) would take that for a crash.
_HEAVY = [m for m in ("ray", "mlflow") if importlib.util.find_spec(m) is not None]
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _HEAVY:
            raise ImportError(f"{name} is blocked by gpu_check.sh")
sys.meta_path.insert(0, _Block())
PYEOF
export PYTHONPATH=$WORK/noheavy:$PYTHONPATH
export TOKENIZERS_PARALLELISM=false
stamp "setup: device $DEVICE, GLUE $GLUE, small $SMALL"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
$PY -c "import ray" 2>/dev/null && echo "WARNING: ray importable (block failed)"

# ---- (1) speed: ikd round / kd step per estimator and lookahead, fused and unfused, peak
# memory, cached/live kd, course-step samples/s eager and compiled (B=32, 128; L=128, bf16)
stamp "bench_trainer (base: 12L teacher, 6L student, hidden 768, B=32, L=128; SMALL: tiny)"
if [ "$SMALL" = 1 ]; then
  BENCH=(--size tiny --reps 1 --warmup 0 --compile-batches 8 --estimators finite_difference
         --lookahead sgd)
else
  BENCH=(--size base --reps 10 --warmup 2 --compile-batches 32 128 --lookahead sgd adam)
fi
[ "${SKIP_BENCH:-0}" = 1 ] || timeout 330 $PY benchmarks/bench_trainer.py --device "$DEVICE" "${BENCH[@]}" --skip padding \
  --json > "$OUTDIR/bench.json"
echo "bench exit $?"; cat "$OUTDIR/bench.json"; echo

# ---- (2) one short kd and one short ikd trial, random-init models, real SST-2
stamp "tokenizer and model config from SST-2 train"
$PY - "$GLUE" "$WORK/tok" "$SMALL" <<'PYEOF'
import csv, sys
from pathlib import Path
from tokenizers import BertWordPieceTokenizer
from tokenizers.processors import BertProcessing
from transformers import BertConfig, PreTrainedTokenizerFast
glue, out, small = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
with open(glue / "SST-2" / "train.tsv", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
tok = BertWordPieceTokenizer(lowercase=True)
tok.train_from_iterator((r["sentence"] for r in rows), vocab_size=8000, min_frequency=2,
                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
tok._tokenizer.post_processor = BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                               ("[CLS]", tok.token_to_id("[CLS]")))
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok._tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
    sep_token="[SEP]", mask_token="[MASK]",
    model_input_names=["input_ids", "token_type_ids", "attention_mask"])
out.mkdir(parents=True, exist_ok=True)
fast.save_pretrained(out)
width = 128 if small else 256
BertConfig(vocab_size=len(fast), hidden_size=width, num_hidden_layers=4,
           num_attention_heads=4, intermediate_size=4 * width,
           max_position_embeddings=128).save_pretrained(out)
assert len(fast) > 1000, f"tokenizer training failed: vocabulary of {len(fast)}"
print(f"vocab {len(fast)} from {len(rows)} sentences; hidden {width}; "
      f"{fast('a fine film')['input_ids']}")
PYEOF

if [ "$SMALL" = 1 ]; then
  ROWS=8000; EPOCHS=2; EVAL=872
else
  ROWS=20000; EPOCHS=2; EVAL=872
fi
cat > "$WORK/check.yaml" <<YEOF
name: gpu-check
tasks: [sst2]
methods: [kd, ikd]
data: {source: glue_dir, glue_dir: $GLUE, max_length: 64, max_train_samples: $ROWS,
       max_eval_samples: $EVAL}
teacher: {model: $WORK/tok, init: random, config: {num_hidden_layers: 4}, epochs: $EPOCHS,
          lr: 5.0e-4, batch_size: 64}
student: {model: $WORK/tok, init: random, config: {num_hidden_layers: 2}}
train: {epochs: $EPOCHS, batch_size: 64, lr: 5.0e-4, log_every: 20}
ikd: {estimator: finite_difference, lookahead: adam, order: student_first}
search: {temperature: [2], exam_every: [5], teacher_lr: [1.0e-5], seeds: [1]}
YEOF
for m in kd ikd; do
  stamp "ikd-sweep train --method $m"
  $PY -m ikd_sweep.cli train "$WORK/check.yaml" --task sst2 --method $m --home "$WORK/home" \
    --device "$DEVICE" --no-track > "$OUTDIR/$m.json" 2> "$WORK/$m.err"
  echo "exit $?"; tail -n 4 "$WORK/$m.err"; cat "$OUTDIR/$m.json"
  grep -h '"exam/' "$WORK"/home/single/gpu-check/*ikd*/metrics.jsonl 2>/dev/null | tail -n 2
done

stamp "verdict"
$PY - "$GLUE" "$OUTDIR" <<'PYEOF'
import csv, json, sys
from pathlib import Path
glue, out = Path(sys.argv[1]), Path(sys.argv[2])
with open(glue / "SST-2" / "dev.tsv", newline="") as f:
    labels = [r["label"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
majority = max(labels.count(v) for v in set(labels)) / len(labels)
ok = True
for m in ("kd", "ikd"):
    try:
        res = json.loads((out / f"{m}.json").read_text())
        dev = res["final/dev_main"]
    except Exception as e:  # a failed trial leaves no result
        print(f"{m}: FAIL (no result: {e})")
        ok = False
        continue
    learned = dev > majority + 0.02
    ok &= learned
    print(f"{m}: dev accuracy {dev:.4f} vs majority {majority:.4f}: "
          f"{'PASS' if learned else 'FAIL'}")
print("GPU CHECK", "PASSED" if ok else "FAILED")
sys.exit(0 if ok else 1)
PYEOF
rc=$?
stamp "done"
exit $rc
