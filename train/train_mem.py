"""Instruction tuning entry point (MMedAgent / LLaVA's ``train_mem.py`` flags).

    deepspeed train/train_mem.py --deepspeed scripts/zero2.json --model_name_or_path ... --data_path ...
    torchrun --nproc_per_node 2 train/train_mem.py ...
    python train/train_mem.py ...

See docs/train.md. The logic lives in :mod:`mmedagent.train.run`.
"""

import mmedagent  # noqa: F401  - must come before transformers (arms the torchvision shim)
from mmedagent.train.run import main

if __name__ == "__main__":
    main()
