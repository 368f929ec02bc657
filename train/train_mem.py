"""Instruction tuning entry point (MMedAgent / LLaVA's ``train_mem.py`` flags).

    deepspeed train/train_mem.py --deepspeed scripts/zero2.json --model_name_or_path ... --data_path ...
    torchrun --nproc_per_node 2 train/train_mem.py ...
    python train/train_mem.py ...

See docs/train.md. The logic lives in :mod:`mmedagent.train.run`. Bad flags, bad data, a base model that
cannot be found and a checkpoint that cannot be resumed end with one ``error: ...`` line and exit status 2;
anything else is a traceback.
"""

import sys

import mmedagent  # noqa: F401  - must come before transformers (arms the torchvision shim)
from mmedagent.data.formats import DataError
from mmedagent.model.loading import ModelNotFoundError
from mmedagent.train.args import FlagError
from mmedagent.train.run import main, release_deepspeed_shm
from mmedagent.train.trainer import ResumeError

if __name__ == "__main__":
    try:
        main()
    except (FlagError, DataError, ResumeError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no communication thread left to abort the exiting process
        release_deepspeed_shm()
