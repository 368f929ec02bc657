#!/usr/bin/env bash
# Medical QA / doctor-patient dialogue with Llama-3-8B-Instruct (LoRA or --no-lora).
#
#   bash scripts/recipes/dialogue-llama3.sh --data /data/medqa_train.jsonl [--out DIR] [--push-to-hub OWNER/NAME]
#   bash scripts/recipes/dialogue-llama3.sh --tiny            # tiny random model + generated data, CPU, minutes
#   bash scripts/recipes/dialogue-llama3.sh --help            # every setting and its default
#
# Flags after `--` go to train/train_mem.py unchanged. See docs/recipes.md.
set -euo pipefail
exec "${PYTHON:-python}" -m mmedagent.recipes dialogue-llama3 "$@"
