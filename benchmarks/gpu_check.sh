#!/bin/bash
# The GPU check: agrivlm on a CUDA machine, against the same commands on its CPU.
#
#   bash benchmarks/gpu_check.sh OUT_DIR        # a CUDA machine with agrivlm installed (about 5 minutes)
#
# 1. `agrivlm infer` with the shipped checkpoint — fields on a held-out synthetic Pannonian scene (`agrivlm synth`
#    seed 9000, 1 km², the one benchmarks/learning.py scores), growth stages on the embedded sample's parcels — on
#    the CPU in float32, then on CUDA in float32 and in bfloat16; benchmarks/compare_answers.py counts the answers
#    each CUDA run gave word for word as the CPU did (greedy decoding: float32 should agree on every answer);
# 2. benchmarks/train_step.py: the real trainer's stage-2 step for the tiny and the small (~100M) model on CUDA
#    (train.mixed_precision auto: bf16), with and without the reconstruction loss.
# Outputs: OUT_DIR/gpu_check.log, answers_{fields,growth}.json, train_step_cuda.json. Each step goes on after a
# failure of the one before, so one run shows every problem.
set -o pipefail
export PYTHONUNBUFFERED=1
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"; out=$(cd "$out" && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
TIMEFORMAT="wall %R s"
agrivlm() { python3 -m agrivlm.cli "$@"; }
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
S=agrivlm/sample_data/slovenia_s2_ndvi; P=$work/scene
agrivlm synth --out "$P" --region pannonian --seed 9000 --area-km2 1 --start 2021-01-01 --end 2021-12-31 --no-progress
for run in "cpu float32" "cuda float32" "cuda bfloat16"; do
  set -- $run
  echo "== fields $1 $2"; time agrivlm infer "$P/stack" --masks "$P/cloud_mask" --model default --task fields \
    --batch-size 32 --device "$1" --dtype "$2" --no-progress --out "$work/fields_$1_$2.parquet" | tail -2
  echo "== growth $1 $2"; time agrivlm infer "$S/ndvi" --masks "$S/cloud_mask" --model default --task growth \
    --fields "$S/parcels.gpkg" --field-id index --batch-size 32 --device "$1" --dtype "$2" --no-progress \
    --out "$work/growth_$1_$2.parquet" | tail -2
done
for task in fields growth; do
  python3 benchmarks/compare_answers.py "$work/${task}_cpu_float32.parquet.journal.jsonl" \
    "$work/${task}_cuda_float32.parquet.journal.jsonl" "$work/${task}_cuda_bfloat16.parquet.journal.jsonl" \
    --out "$out/answers_$task.json"
done
echo "== train_step"; python3 benchmarks/train_step.py --sizes tiny,small --steps 20 --warmup 5 \
  --out "$out/train_step_cuda.json"
} 2>&1 | tee "$out/gpu_check.log"
