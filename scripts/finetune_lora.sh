#!/usr/bin/env bash
# MMedAgent's LoRA instruction-tuning recipe (EMNLP 2024 Findings), flags as its README gives them.
#
#   bash scripts/finetune_lora.sh MODEL DATA IMAGES [OUTPUT] [extra train_mem.py flags...]
#
# MODEL: a LLaVA checkpoint (transformers layout, or original LLaVA/LLaVA-Med layout: converted on load).
# DATA / IMAGES: training records and their image folder (comma-separated lists allowed).
# Relative paths are read from the directory you run it in, wherever the script lives.
# Environment: NUM_GPUS (default: all visible), DEEPSPEED_CONFIG (default: scripts/zero2.json),
# VISION_TOWER (default: openai/clip-vit-large-patch14-336; must agree with the checkpoint's tower),
# REPORT_TO (default: none; MMedAgent used wandb).
# Needs a CUDA machine with bf16 and tf32 (Ampere or newer); see docs/train.md for CPU runs.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 3 ]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"  # the header comment, whatever its length
  exit 2
fi
MODEL=$1 DATA=$2 IMAGES=$3 OUTPUT=${4:-./checkpoints/mmedagent-lora}
shift $(( $# < 4 ? $# : 4 ))
GPUS=()
[ -n "${NUM_GPUS:-}" ] && GPUS=(--num_gpus "$NUM_GPUS")

deepspeed "${GPUS[@]}" "$REPO/train/train_mem.py" \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --deepspeed "${DEEPSPEED_CONFIG:-$REPO/scripts/zero2.json}" \
    --model_name_or_path "$MODEL" \
    --version v1 \
    --data_path "$DATA" \
    --image_folder "$IMAGES" \
    --vision_tower "${VISION_TOWER:-openai/clip-vit-large-patch14-336}" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length False \
    --bf16 True \
    --output_dir "$OUTPUT" \
    --num_train_epochs 30 \
    --per_device_train_batch_size 12 \
    --gradient_accumulation_steps 2 \
    --save_strategy steps \
    --save_steps 3000 \
    --save_total_limit 2 \
    --learning_rate 2e-4 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to "${REPORT_TO:-none}" \
    "$@"
