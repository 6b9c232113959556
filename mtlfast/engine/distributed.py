"""torchrun / DDP plumbing: process-group set-up from the environment, rank helpers, reductions.

``torchrun --nproc_per_node=N -m mtlfast train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; each process
then uses ``cuda:LOCAL_RANK`` (NCCL) or, with ``train.device=cpu`` or no GPU, the CPU (gloo). Without those
variables everything is a no-op and the run is single-process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


#: Collective timeout. The other ranks wait in a barrier while rank 0 evaluates (unless eval.sharded): a
#: PASCAL-Context validation pass (5105 images, edge odsF ~0.5 s of a core each, eval.edge_workers processes)
#: can outlast NCCL's default 10 minutes (gloo's 30), which would abort the run.
TIMEOUT = timedelta(hours=3)


def init_distributed(device_type: str) -> DistInfo:
    """Joins the process group torchrun describes (no-op when WORLD_SIZE is unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise RuntimeError("distributed: WORLD_SIZE > 1 but RANK/LOCAL_RANK are not set; launch with torchrun")
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))
    if device_type == "cuda":
        visible = torch.cuda.device_count()
        if info.local_rank >= visible:  # NCCL takes one GPU per process
            raise RuntimeError(f"distributed: LOCAL_RANK={info.local_rank} but {visible} CUDA device(s) are visible: "
                               f"launch at most {visible} processes per node, or set train.device=cpu (gloo)")
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_over_ranks(values: dict[str, torch.Tensor], info: DistInfo) -> dict[str, float]:
    """Each scalar tensor's mean over the ranks, as floats (one all-reduce; the values as they are in one process).
    Every rank then logs, and checks for a non-finite loss, the same numbers."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if info.enabled:
        dist.all_reduce(stacked)
        stacked /= info.world_size
    return dict(zip(values, stacked.tolist()))


def sum_over_ranks(counts: dict[str, dict[str, torch.Tensor]], info: DistInfo) -> dict[str, dict[str, torch.Tensor]]:
    """{task: {name: integer scalar}} summed over the ranks (one all-reduce; as they are in one process)."""
    if not info.enabled:
        return counts
    keys = [(task, name) for task, named in counts.items() for name in named]
    stacked = torch.stack([counts[task][name].reshape(()).to(torch.int64) for task, name in keys])
    dist.all_reduce(stacked)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (task, name), value in zip(keys, stacked):
        out.setdefault(task, {})[name] = value
    return out


def broadcast_from_main(tensors, info: DistInfo) -> None:
    """Copies rank 0's values into ``tensors`` on every rank, in place (no-op in one process)."""
    if info.enabled:
        for tensor in tensors:
            dist.broadcast(tensor, 0)


def gather_objects(value, info: DistInfo) -> list:
    """``value`` of every rank, in rank order, on every rank (``[value]`` in one process)."""
    if not info.enabled:
        return [value]
    values = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
