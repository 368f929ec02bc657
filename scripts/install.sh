#!/usr/bin/env bash
# Make .venv/ and install mmedagent with everything that runs on a CPU machine.
# torch is installed first and every later install runs under constraints.txt, so nothing can pull
# a newer (CUDA) torch. Set PYTHON to choose the interpreter, EXTRAS to choose the extras, TORCH_INDEX
# to take torch from another index (https://download.pytorch.org/whl/cpu: the CPU build, where the
# default index would give the CUDA one, as stock PyPI does on Linux).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-all}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_CONSTRAINT="$PWD/constraints.txt" DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
echo "installed: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
