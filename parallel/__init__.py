"""Many processes: torchrun's environment, one device per rank, and relaunching a CLI under torchrun.

Both stages run on torch.distributed as torchrun starts it (RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous in the environment), so multi-GPU and multi-node runs are torchrun's, not ours:

    torchrun --nproc-per-node 8 -m n2n.extract ...            one node, eight GPUs
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m n2n.extract ...

A process started any other way is rank 0 of 1 and never touches torch.distributed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# A rank that finishes its share waits for the slowest one at a barrier: allow for a long wait
# (a resumed run where one rank still has hours to go). A rank that dies still ends the job at
# once: torchrun stops the others.
BARRIER_TIMEOUT = timedelta(hours=72)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world``, ``local`` on its node."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        """Rank 0: the one that commits, saves and prints."""
        return self.rank == 0

    def init(self, backend: str = "gloo") -> bool:
        """Join the process group where there is more than one process; True if this call joined it."""
        if self.world == 1 or dist.is_initialized():
            return False
        dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
        return True

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


ONE_PROCESS = Ranks()


def pick_device(name: str, local_rank: int = 0, error: type[Exception] = RuntimeError) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; under torchrun, plain cuda is the rank's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"--device {name} asked for, but this torch sees no CUDA GPU; use --device cpu")
    if name == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise error(f"process {local_rank} of this node has no GPU of its own ({torch.cuda.device_count()} "
                        "visible): start at most one process per GPU (--nproc / --nproc-per-node)")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def relaunch(nproc: int, module: str, argv: list[str]) -> int:
    """Run ``python -m module argv`` (less its ``--nproc N``) as ``nproc`` processes on this node under
    torchrun, with a standalone rendezvous on a free port; returns the job's exit status.

    Each process gets an equal share of this process's cores for torch's threads (``OMP_NUM_THREADS``,
    unless set): torchrun's own default is one thread per process, which leaves a CPU run on many
    cores nearly idle."""
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // nproc)))
    command = ["--standalone", "--nproc-per-node", str(nproc), "-m", module, *without_nproc(argv)]
    args = get_args_parser().parse_args(command)
    try:
        run(args)
    except Exception as err:  # torchrun's ChildFailedError: a table of which rank failed and how
        print(f"{err}\nerror: a process of the {nproc} failed (above); rerun the same command to resume",
              file=sys.stderr)
        return 1
    return 0


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus ``--nproc N``: what each process that torchrun starts runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
