#!/usr/bin/env bash
# The whole pipeline on the embedded default, offline, on CPU:
# tiny teacher -> demo corpus -> teacher latents (RC's paired set) -> ARIA distillation -> student pipeline.
# Usage: bash examples/demo.sh [--sdxl | --sd3] [OUT_DIR] [extra train_aria_distill.py flags...]
#   --sdxl: a tiny SDXL-topology teacher (two text encoders, pooled embeddings, time ids) and a KOALA
#           koala_700m student instead of SD-1.x and bk_small; default OUT_DIR demo_output_sdxl.
#   --sd3:  a tiny SD 3.5-Medium-topology teacher (MMDiT transformer, two CLIP encoders and a T5, flow
#           matching) and a depth_1_2 student (half the transformer blocks); default OUT_DIR demo_output_sd3.
set -euo pipefail
cd "$(dirname "$0")/.."
FAMILY=sd
if [ "${1:-}" = "--sdxl" ]; then FAMILY=sdxl; shift; elif [ "${1:-}" = "--sd3" ]; then FAMILY=sd3; shift; fi
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
PY=.venv/bin/python
if [ "$FAMILY" = sdxl ]; then
  OUT="${1:-demo_output_sdxl}"; TEACHER_FLAGS=(--sdxl); STUDENT=koala_700m; PIPELINE=StableDiffusionXLPipeline
elif [ "$FAMILY" = sd3 ]; then
  OUT="${1:-demo_output_sd3}"; TEACHER_FLAGS=(--sd3); STUDENT=depth_1_2; PIPELINE=StableDiffusion3Pipeline
else
  OUT="${1:-demo_output}"; TEACHER_FLAGS=(); STUDENT=bk_small; PIPELINE=StableDiffusionPipeline
fi
shift || true
mkdir -p "$OUT"

[ -d "$OUT/tiny-teacher" ] || $PY -m aria_utils.fixtures.tiny_teacher "${TEACHER_FLAGS[@]+"${TEACHER_FLAGS[@]}"}" \
  --output_dir "$OUT/tiny-teacher" --seed 0
[ -f "$OUT/data/prompts.csv" ] || $PY -m aria_utils.fixtures.demo_corpus --output_dir "$OUT/data"
# Resumable: a finished set is kept as is, an interrupted one is completed. (The test of this script makes a
# smaller set through the two variables; the defaults are the demo's.)
$PY -m aria_utils.generate_teacher_data \
  --pretrained_model_name_or_path "$OUT/tiny-teacher" --prompt_file "$OUT/data/prompts.csv" \
  --category_column category --num_prompts "${ARIA_DEMO_NUM_PROMPTS:-256}" \
  --num_inference_steps "${ARIA_DEMO_INFERENCE_STEPS:-10}" --batch_size 32 --shard_size 64 \
  --output_dir "$OUT/teacher-data"

# Re-running the demo resumes the student run from its latest checkpoint (a finished run is only re-exported);
# delete $OUT/student, or add --overwrite_output_dir, to train it again (then there is nothing to resume).
RESUME=(--resume_from_checkpoint latest)
for flag in "$@"; do
  if [ "$flag" = "--overwrite_output_dir" ]; then RESUME=(); fi
done
.venv/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no --num_cpu_threads_per_process 2 train_aria_distill.py \
  --pretrained_model_name_or_path "$OUT/tiny-teacher" \
  --student_config "$STUDENT" \
  --train_data_dir "$OUT/teacher-data" \
  --prompt_file "$OUT/data/prompts.csv" \
  --condition_sampling aria --num_regions 8 --aria_warmup_steps 20 \
  --train_batch_size 16 --max_train_steps 200 --learning_rate 1e-4 \
  --checkpointing_steps 100 --checkpoints_total_limit 2 \
  --validation_prompts "a photo of a cat in a meadow" "a violin on a stage" \
  --validation_steps 100 --validation_inference_steps 10 \
  "${RESUME[@]+"${RESUME[@]}"}" --output_dir "$OUT/student" "$@"

$PY - "$OUT/student" "$PIPELINE" <<'PYEOF'
import sys
import torch
from aria_utils.quiet import silence_known_harmless_messages
silence_known_harmless_messages()
import diffusers
folder, pipeline_name = sys.argv[1], sys.argv[2]
pipe = getattr(diffusers, pipeline_name).from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)  # four steps; the line below says what came of them
image = pipe("a violin on a stage", num_inference_steps=4, generator=torch.manual_seed(0)).images[0]
image.save(f"{folder}/demo_sample.png")
print(f"{pipeline_name} student at {folder} loads and generates: {folder}/demo_sample.png")
print(f"Results: {folder}/README.md (model card: regions, speed and size), {folder}/validation/ (teacher-over-student "
      f"images), {folder}/aria_regions.png (discrepancy per region), {folder}/train_summary.json")
PYEOF
