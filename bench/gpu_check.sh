#!/usr/bin/env bash
# One pass over booth on a GPU: benchmarks against diffusers and a functional check of the CLI's CUDA paths.
#
#   1. bench_inference.py: booth vs diffusers txt2img, SD1 random weights, fp16, 512x512, 20 DDIM steps, batch 1;
#   2. bench_train.py: DreamBooth step (prior preservation), fp16 mixed precision, 512: full fine-tuning and LoRA
#      (--lora), then full fine-tuning with --gradient-checkpointing, then booth's lean step (bf16, Adafactor,
#      --fused-backward, gradient checkpointing) against diffusers' modules with the same optimizer, and
#      --modes: diffusers' AdamW against booth's default, adamw8bit and --lean, each booth run with its memory
#      forecast (booth.train.forecast) against its CUDA peak;
#   3. the CLI on tiny random weights: dreambooth (fp16 + gradient checkpointing, bf16 + text encoder, fp16 LoRA),
#      txt2img (base, trained checkpoints, LoRA), img2img, and `txt2img -m demo` when booth/data/demo.safetensors
#      exists. Each must exit 0 and write its checkpoints/images.
#
# Needs booth's dependencies and diffusers (+ peft for the LoRA bench). Run from the repository root:
#
#   bench/gpu_check.sh [RESULTS_DIR]        # default: $OUT, else gpu-check/
#
# Each step has a timeout and the script carries on when one fails; RESULTS_DIR gets a few logs and
# summary.txt (one line per step: rc, seconds). The SD1 weights are built once in $WORKDIR (a few GB).
# Environment overrides (defaults are the GPU figures): DEVICE=cuda DTYPE=fp16 PRECISION=fp16 SIZE=512
# INF_STEPS=20 REPEATS=2 TRAIN_STEPS=12 LORA_RANK=4 TINY_HW=64 TINY_ITERS=4 TINY_PRECISIONS="fp16 bf16"
# WORKDIR=bench/.cache BUDGET_S=500 (deadline of the whole script) RESERVE_S=120 (kept for part 3)
# PYTHON=python3. A CPU dry run: DEVICE=cpu DTYPE=fp32 PRECISION=fp32 TINY_PRECISIONS=fp32 SIZE=64 ...

set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TQDM_MININTERVAL=5
RESULTS=${1:-${OUT:-gpu-check}}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-fp16}
PRECISION=${PRECISION:-fp16}
SIZE=${SIZE:-512}
INF_STEPS=${INF_STEPS:-20}
REPEATS=${REPEATS:-2}
TRAIN_STEPS=${TRAIN_STEPS:-12}
LORA_RANK=${LORA_RANK:-4}
TINY_HW=${TINY_HW:-64}
TINY_ITERS=${TINY_ITERS:-4}
TINY_PRECISIONS=${TINY_PRECISIONS:-fp16 bf16}
WORKDIR=${WORKDIR:-bench/.cache}
BUDGET_S=${BUDGET_S:-500}
RESERVE_S=${RESERVE_S:-120}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/booth-gpu-check.XXXXXX")
SUMMARY=$RESULTS/summary.txt
END=$(($(date +%s) + BUDGET_S))
: >"$SUMMARY"
set -x

# step NAME LIMIT_S LOG CMD...: run CMD under a timeout (capped by the deadline less $reserve), output appended
# to RESULTS/LOG and echoed; one line "NAME rc=RC seconds=S" in summary.txt. Never stops the script.
reserve=0
step() {
    local name=$1 limit=$2 log=$RESULTS/$3 left rc t0 t1
    shift 3
    left=$((END - $(date +%s) - reserve))
    ((left < limit)) && limit=$left
    if ((limit < 15)); then
        echo "$name SKIPPED (deadline)" | tee -a "$SUMMARY"
        return 1
    fi
    echo "=== $name (timeout ${limit}s): $*" >>"$log"
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s.%N)
    echo "$name rc=$rc seconds=$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")" | tee -a "$SUMMARY" "$log"
    return "$rc"
}

# check NAME CONDITION...: a test of what a step wrote, recorded like a step.
check() {
    local name=$1
    shift
    if "$@"; then echo "$name ok" | tee -a "$SUMMARY"; else echo "$name FAILED" | tee -a "$SUMMARY"; fi
}
count() { find "$1" -name "$2" 2>/dev/null | wc -l; }
has() { (($(count "$1" "$2") >= ${3:-1})); }

# ------------------------------------------------------------------------------------------------- environment
{
    nvidia-smi
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|diffusers|transformers|peft|accelerate|safetensors|huggingface.hub|tokenizers|numpy|pillow) '
    git log -1 --oneline 2>/dev/null
} 2>&1 | tee "$RESULTS/env.log"

# ------------------------------------------------------------------------------------------ 1-2. SD1 benchmarks
reserve=$RESERVE_S
step prepare-sd1-weights 240 bench.log "$PY" -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
from bench_inference import prepare; print(prepare(Path('$WORKDIR')))"
step bench-inference 180 bench.log "$PY" bench/bench_inference.py --device "$DEVICE" --dtype "$DTYPE" \
    --size "$SIZE" --steps "$INF_STEPS" --batch 1 --repeats "$REPEATS" --workdir "$WORKDIR"
step bench-train-full+lora 240 bench.log "$PY" bench/bench_train.py --device "$DEVICE" --precision "$PRECISION" \
    --size "$SIZE" --steps "$TRAIN_STEPS" --lora "$LORA_RANK" --workdir "$WORKDIR"
step bench-train-full-gc 180 bench.log "$PY" bench/bench_train.py --device "$DEVICE" --precision "$PRECISION" \
    --size "$SIZE" --steps "$TRAIN_STEPS" --gradient-checkpointing --workdir "$WORKDIR"
step bench-train-lean 180 bench.log "$PY" bench/bench_train.py --device "$DEVICE" --precision bf16 \
    --size "$SIZE" --steps "$TRAIN_STEPS" --gradient-checkpointing --optimizer adafactor --fused-backward \
    --workdir "$WORKDIR"
step bench-train-modes 300 bench.log "$PY" bench/bench_train.py --modes --device "$DEVICE" \
    --precision "$PRECISION" --size "$SIZE" --steps "$TRAIN_STEPS" --workdir "$WORKDIR"

# ---------------------------------------------------------------------------------- 3. the CLI on tiny weights
reserve=0
BASE=$TMP/tiny.safetensors
DOG=tests/data/dog
D=(-d "$DEVICE")
step tiny-weights 60 cli.log "$PY" -c "from booth.checkpoint import save_checkpoint; from booth.config import TINY; \
from booth.model import random_weights; save_checkpoint(random_weights(TINY, seed=0).state_dict(), '$BASE')"
DB=(dreambooth -c dog -i "$DOG" -m "$BASE" --hw "$TINY_HW" "$TINY_HW" --class-img-count 2 --gb 2 --ddim-steps 2
    --iterations "$TINY_ITERS" --seed 3 "${D[@]}")
GEN=(-p "a photo of a sks dog" --hw "$TINY_HW" "$TINY_HW" --steps 4 --seed 1 "${D[@]}")
for p in $TINY_PRECISIONS; do
    o=$TMP/db-$p
    step "dreambooth-$p-gc" 90 cli.log "$PY" -m booth "${DB[@]}" --precision "$p" --gradient-checkpointing \
        -o "$o/full"
    check "dreambooth-$p-gc-checkpoint" has "$o/full/run0/ckpts" "*.safetensors"
    step "dreambooth-$p-text-encoder" 90 cli.log "$PY" -m booth "${DB[@]}" --precision "$p" -t -o "$o/te"
    check "dreambooth-$p-text-encoder-checkpoint" has "$o/te/run0/ckpts" "*.safetensors"
    if [ "$p" != fp16 ]; then # the fused step refuses fp16 loss scaling
        step "dreambooth-$p-fused" 90 cli.log "$PY" -m booth "${DB[@]}" --precision "$p" --fused-backward \
            --optimizer adafactor -o "$o/fused"
        check "dreambooth-$p-fused-checkpoint" has "$o/fused/run0/ckpts" "*.safetensors"
    fi
    if [ "$p" = bf16 ]; then # --lean holds bf16 weights
        step "dreambooth-lean" 90 cli.log "$PY" -m booth "${DB[@]}" --lean -o "$o/lean"
        check "dreambooth-lean-checkpoint" has "$o/lean/run0/ckpts" "*.safetensors"
    fi
    step "dreambooth-$p-lora" 90 cli.log "$PY" -m booth "${DB[@]}" --precision "$p" --lora 4 -o "$o/lora"
    check "dreambooth-$p-lora-file" has "$o/lora/run0/ckpts" "*.safetensors"
    step "txt2img-$p-base" 60 cli.log "$PY" -m booth txt2img -c "$BASE" "${GEN[@]}" --precision "$p" -v 2 -b 2 \
        -o "$o/t2i-base"
    check "txt2img-$p-base-images" has "$o/t2i-base" "*.png" 2
    step "txt2img-$p-trained" 60 cli.log "$PY" -m booth txt2img -c "$o/full/run0/ckpts" "${GEN[@]}" \
        --precision "$p" --sampler euler_a -o "$o/t2i-trained"
    check "txt2img-$p-trained-images" has "$o/t2i-trained" "*.png"
    lora=$(find "$o/lora/run0/ckpts" -name "*.safetensors" 2>/dev/null | sort | tail -1)
    step "txt2img-$p-lora" 60 cli.log "$PY" -m booth txt2img -c "$BASE" --lora "${lora:-missing}:0.8" "${GEN[@]}" \
        --precision "$p" --sampler ddim -o "$o/t2i-lora"
    check "txt2img-$p-lora-images" has "$o/t2i-lora" "*.png"
    step "img2img-$p" 60 cli.log "$PY" -m booth img2img -c "$BASE" -i "$DOG/00.jpg" -s 0.6 "${GEN[@]}" \
        --precision "$p" -o "$o/i2i"
    check "img2img-$p-images" has "$o/i2i" "*.png"
done
if [ -f booth/data/demo.safetensors ]; then
    step txt2img-demo 90 cli.log "$PY" -m booth txt2img -m demo -p "a red circle on a blue background" -v 4 \
        --seed 0 "${D[@]}" -o "$TMP/demo"
    check txt2img-demo-images has "$TMP/demo" "*.png" 4
    step txt2img-demo-again 60 cli.log "$PY" -m booth txt2img -m demo -p "a red circle on a blue background" -v 4 \
        -b 4 --seed 0 "${D[@]}" -o "$TMP/demo-b4"
    first=$(find "$TMP/demo" -name "*.png" | sort | head -1)
    [ -n "$first" ] && cp "$first" "$RESULTS/demo.png"
fi
find "$TMP" -type f -printf "%10s %P\n" | sort -k2 | head -200 >>"$RESULTS/cli.log"
rm -rf "$TMP"
set +x
echo "==== summary"
cat "$SUMMARY"
if grep -vq "rc=0\| ok$" "$SUMMARY"; then
    echo "SOME STEPS FAILED (logs in $RESULTS)"
    exit 1
fi
echo "all steps passed (logs in $RESULTS)"
