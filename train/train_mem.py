"""Instruction tuning entry point (MMedAgent / LLaVA's ``train_mem.py`` flags).

    deepspeed train/train_mem.py --deepspeed scripts/zero2.json --model_name_or_path ... --data_path ...
    torchrun --nproc_per_node 2 train/train_mem.py ...
    python train/train_mem.py ...

See docs/train.md. The logic lives in :mod:`mmedagent.train.run`. Bad flags, bad data, a base model that
cannot be found and a checkpoint that cannot be resumed end with one ``error: ...`` line and exit status 2;
anything else is a traceback.
"""

import logging
import os
import socket
import sys

import torch.distributed as dist

import mmedagent  # noqa: F401  - must come before transformers (arms the torchvision shim)
from mmedagent.data.formats import DataError
from mmedagent.model.loading import BackendUnavailable, ModelNotFoundError
from mmedagent.train.args import FlagError
from mmedagent.train.run import main, release_deepspeed_shm
from mmedagent.train.trainer import ResumeError


def single_rank_without_launcher(argv: list[str]) -> None:
    """``python train/train_mem.py --deepspeed ...`` (no launcher): run as the one rank of a one-rank job.
    Without a launcher's RANK / MASTER_* variables DeepSpeed looks for its peers through MPI and fails
    (``No module named 'mpi4py'``) after the model has loaded."""
    if "RANK" in os.environ or not any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def leave_when_done() -> None:
    """End a rank of a finished multi-process run at once: every rank has passed the final barrier (all
    saved), so nothing is left to do, and exiting normally runs the C++ destructors of the communication
    extensions, where a rank can abort ("terminate called without an active exception", exit -6) after
    the job succeeded and fail the launcher. Logs and output streams are flushed first."""
    release_deepspeed_shm()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def error_line(e: Exception) -> str:
    """The message of an error that ends the run. One raised in a data-loader worker (``--dataloader_num_workers``,
    e.g. a damaged image found while decoding) is re-raised by PyTorch with the worker's whole traceback as its
    message; its last line holds the worker's own message."""
    text = str(e)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        for name in (f"{type(e).__module__}.{type(e).__qualname__}", type(e).__qualname__):  # the message's first line
            if (at := text.rfind(f"\n{name}: ")) >= 0:
                return text[at + len(name) + 3:].rstrip()
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


if __name__ == "__main__":
    single_rank_without_launcher(sys.argv[1:])
    try:
        main()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank leaves while a peer is still in a collective or saving
            leave_when_done()
    except (FlagError, DataError, ResumeError, ModelNotFoundError, BackendUnavailable) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no communication thread left to abort the exiting process
        release_deepspeed_shm()
