#!/usr/bin/env bash
# The main job, end to end, on the Fashion-MNIST subset embedded in the package (no network needed beyond pip):
# install, train a small DDPM with 2 real DDP processes on the CPU, save the pipeline (in $OUT itself, as diffusers'
# train_unconditional.py does), sample a grid,
# evaluate bits/dim and FID-FMNIST, and print where every output is.
#
#   bash quickstart.sh                 # 15 to 25 minutes on 2 CPU cores (10-15 training, 4-8 evaluating)
#   STEPS=300 bash quickstart.sh       # shorter; OUT=..., PROCESSES=1 also work
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-runs/quickstart}
STEPS=${STEPS:-1500}
PROCESSES=${PROCESSES:-2}

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11) and "ddpm_hf needs Python >= 3.11; python3 is " + sys.version.split()[0])'
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# the versions the tests last passed with (constraints.txt)
export PIP_BUILD_CONSTRAINT="$PWD/constraints.txt"
python -c "import torch" 2>/dev/null || pip install -q -c constraints.txt torch==2.13.0
python -c "import ddpm_hf, pytest" 2>/dev/null || pip install -q -c constraints.txt -e ".[test]"

# --recipe short: the settings measured best for runs this short (docs/benchmarks.md, "Recipes for short runs")
TRAIN_ARGS=(--preset small-28 --recipe short --dataset_name embedded:fashion_mnist --max_train_steps "$STEPS"
  --train_batch_size $((64 / PROCESSES)) --data_streams "$PROCESSES" --lr_warmup_steps 100 --ema_warmup
  --checkpointing_steps 500 --save_images_steps 500 --ddpm_num_inference_steps 100 --output_dir "$OUT")
# a quickstart stopped part-way continues from its last checkpoint; a finished one is trained again from the start
if [ -f "$OUT/model_index.json" ]; then
  TRAIN_ARGS+=(--overwrite_output_dir)
else
  TRAIN_ARGS+=(--resume_from_checkpoint latest)
fi
echo "== training ($PROCESSES process(es), $STEPS steps, global batch 64) =="
if [ "$PROCESSES" -gt 1 ]; then
  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes "$PROCESSES" training/train.py "${TRAIN_ARGS[@]}"
else
  accelerate launch --num_cpu_threads_per_process 2 training/train.py "${TRAIN_ARGS[@]}"
fi

echo "== sampling =="
ddpm-hf sample "$OUT" --num_images 64 --num_inference_steps 100 --out "$OUT/samples-final"

echo "== evaluating: bits/dim (exact bound, 64 test images), FID-FMNIST and KID (500 samples), figures =="
ddpm-hf evaluate "$OUT" --data embedded:fashion_mnist --metrics bpd,rd,fid,kid,progressive,interpolation \
  --num_bpd_images 64 --num_samples 500 --num_reference 2000 --num_inference_steps 100 --out "$OUT/eval"

cat <<EOF

Done. Outputs:
  pipeline (diffusers format):        $OUT  (model_index.json, unet/, scheduler/)
  samples:                            $OUT/samples-final_grid.png  (images in $OUT/samples-final/; $OUT/samples/ in training)
  evaluation:                         $OUT/eval/results.json, rate_distortion.png, progressive.png, interpolation.png
  checkpoints:                        $OUT/checkpoint-*
  tensorboard logs:                   $OUT/logs   (tensorboard --logdir $OUT/logs)
Load it anywhere: DiffusionPipeline.from_pretrained("$OUT")
EOF
