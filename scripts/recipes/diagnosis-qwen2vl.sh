#!/usr/bin/env bash
# Multimodal diagnosis with Qwen2-VL-2B-Instruct (LoRA), served by serve/controller.py.
#
#   bash scripts/recipes/diagnosis-qwen2vl.sh --data /data/medtrinity_subset.parquet [--out DIR] [--push-to-hub OWNER/NAME]
#   bash scripts/recipes/diagnosis-qwen2vl.sh --tiny            # tiny random model + generated data, CPU, minutes
#   bash scripts/recipes/diagnosis-qwen2vl.sh --help            # every setting and its default
#
# Flags after `--` go to train/train_mem.py unchanged. See docs/recipes.md.
set -euo pipefail
exec "${PYTHON:-python}" -m mmedagent.recipes diagnosis-qwen2vl "$@"
