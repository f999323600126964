#!/usr/bin/env bash
# Issue 10 on a lent GPU, in one `run` of the device tool (≤ ~9 minutes): train the default model from scratch on
# the 60,000 MNIST training digits for as many steps as TRAIN_S seconds allow (measured, not guessed), then
# evaluate it against the 10,000 test digits (N = EVAL_N, DDPM-1000, DDIM-50, UniPC-20) with the evaluator's
# classifier; then issue 11's quality-vs-cost curve of every sampler on the new model (bench/sampler_quality.py,
# on the same device). Everything comes back under $OUT: model/ (EMA weights + config), work/ (train_state.pt,
# loss.jsonl, sample grids, ema_<d>/ extra EMAs), eval/*.json, curve/sampler_quality.{json,png}, log.txt.
#
# Prepare here, once (the data and classifier travel in the git-ignored .gpu/, ~12 MB):
#     echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu
#     cp ../shared/data/mnist/*-ubyte.gz .gpu/ && cp /work/runs/classifier-v2/classifier.safetensors .gpu/
# Dry-run here (a few steps on the CPU):
#     DEVICE=cpu DTYPE=float32 TRAIN_S=20 PROBE_STEPS=11 BATCH=16 EVAL_N=16 EVAL_ROWS=ddim:5 CURVE_STEPS=5 \
#         CURVE_CONFIGS=unipc:linspace CURVE_BATCH=16 CURVE_DTYPE=float32 OUT=/tmp/gpu_train PY=.venv/bin/python \
#         bash bench/gpu_train.sh
# On the GPU (device tool `run`, carry [".gpu"], timeout_s 600):
#     bash bench/gpu_train.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

PY=${PY:-python3}
OUT=${OUT:?set OUT (the device tool sets it)}
DATA=${DATA:-.gpu}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
BATCH=${BATCH:-512}
LR=${LR:-2e-3}
TRAIN_S=${TRAIN_S:-270}      # wall-clock budget of the real run, seconds
PROBE_STEPS=${PROBE_STEPS:-60}
EVAL_N=${EVAL_N:-2000}
EVAL_BATCH=${EVAL_BATCH:-1000}
EVAL_ROWS=${EVAL_ROWS:-"ddpm:1000 ddim:50 unipc:20"}
EXTRA_EMAS=${EXTRA_EMAS:-0.995,0.998}
CURVE_CONFIGS=${CURVE_CONFIGS-"ddim:trailing,dpmpp_2m:linspace,dpmpp_2m:karras,dpmpp_3m:linspace,unipc:linspace"}
CURVE_STEPS=${CURVE_STEPS:-5,10,15,20,50,100}
CURVE_BATCH=${CURVE_BATCH:-500}
CURVE_DTYPE=${CURVE_DTYPE:-bfloat16}
mkdir -p "$OUT/eval" "$OUT/curve"
exec > >(tee "$OUT/log.txt") 2>&1

train() {  # train WORKDIR OUTDIR STEPS [extra args]
    local work=$1 out=$2 steps=$3; shift 3
    $PY -m service train --data "$DATA/train-images-idx3-ubyte.gz" --holdout 0 --device "$DEVICE" --dtype "$DTYPE" \
        --batch-size "$BATCH" --lr "$LR" --warmup-steps $((steps / 20 + 1)) --lr-schedule cosine \
        --min-snr-gamma 5 --ema-decay 0.9995 --extra-ema-decays "$EXTRA_EMAS" --steps "$steps" \
        --workdir "$work" --out "$out" "$@"
}

$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

# 1. probe: seconds per step at this batch on this device (the compile-free eager loop; first steps excluded)
probe=$(mktemp -d)
train "$probe/work" "$probe/model" "$PROBE_STEPS" --sample-every 0 --checkpoint-every 100000 --log-every 10 >/dev/null
per_step=$($PY -c "
import json, sys
rows = [json.loads(line) for line in open('$probe/work/loss.jsonl')]
first, last = rows[0], rows[-1]
print((last['seconds'] - first['seconds']) / max(last['step'] - first['step'], 1))")
steps=$($PY -c "print(max(int($TRAIN_S / $per_step), 10))")
echo "probe: $per_step s/step at batch $BATCH on $DEVICE -> $steps steps in ${TRAIN_S} s"

# 2. the run, with checkpoints so that a run cut short still leaves a resumable state and an exported model
start=$(date +%s)
train "$OUT/work" "$OUT/model" "$steps" --sample-every $((steps / 4)) --checkpoint-every $((steps / 10 + 1)) \
    --log-every 50
echo "trained $steps steps x $BATCH in $(( $(date +%s) - start )) s"

# 3. evaluation against the test split, each row at N = EVAL_N (fixed seed 0)
for row in $EVAL_ROWS; do
    set -- ${row/:/ }
    $PY -m service evaluate --model "$OUT/model" --sampler "$1" --steps "$2" --num "$EVAL_N" --batch "$EVAL_BATCH" \
        --device "$DEVICE" --dtype float32 --compiled off --classifier "$DATA/classifier.safetensors" \
        --reference "$DATA/t10k-images-idx3-ubyte.gz" --reference-labels "$DATA/t10k-labels-idx1-ubyte.gz" \
        --train "$DATA/train-images-idx3-ubyte.gz" --train-labels "$DATA/train-labels-idx1-ubyte.gz" \
        --json "$OUT/eval/$1-$2.json" || echo "evaluate $1-$2 failed"
done

# 4. the samplers' quality-vs-cost curve on the new model (issue 11), each point at N = EVAL_N; written point by point
if [ -n "$CURVE_CONFIGS" ]; then
    $PY bench/sampler_quality.py --model "$OUT/model" --device "$DEVICE" --classifier "$DATA/classifier.safetensors" \
        --configs "$CURVE_CONFIGS" --steps "$CURVE_STEPS" --num "$EVAL_N" --num-many-steps "$EVAL_N" \
        --batch "$CURVE_BATCH" --dtype "$CURVE_DTYPE" --json "$OUT/curve/sampler_quality.json" \
        --plot "$OUT/curve/sampler_quality.png" || echo "sampler curve failed"
fi
echo "done in $SECONDS s"
