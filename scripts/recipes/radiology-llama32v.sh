#!/usr/bin/env bash
# Radiology captioning with Llama-3.2-11B-Vision-Instruct (QLoRA on a GPU).
#
#   bash scripts/recipes/radiology-llama32v.sh --data unsloth/Radiology_mini [--out DIR] [--push-to-hub OWNER/NAME]
#   bash scripts/recipes/radiology-llama32v.sh --data roco/traindata.csv --image-column name --image-folder roco/images
#   bash scripts/recipes/radiology-llama32v.sh --tiny            # tiny random model + generated data, CPU, minutes
#   bash scripts/recipes/radiology-llama32v.sh --help            # every setting and its default
#
# Flags after `--` go to train/train_mem.py unchanged. See docs/recipes.md.
set -euo pipefail
exec "${PYTHON:-python}" -m mmedagent.recipes radiology-llama32v "$@"
