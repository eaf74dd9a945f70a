"""Several processes (torchrun or accelerate launch): DistributedDataParallel through fastai.

`--bs` stays the global batch of one optimizer step: with N processes each trains on bs / N
images of its own shard per step, so the learning rate and the number of steps per epoch mean
the same as in one process. Validation runs on the whole validation set in every process, so
the metrics need no reduction across processes and equal a one-process evaluation.

fastai's `DistributedTrainer` assumes CUDA twice; on the CPU (gloo) this module
- passes `cpu=True` to accelerate's `Accelerator`, which otherwise sees no GPU and quietly
  trains each process alone (no process group),
- skips `SyncBatchNorm`, which only runs on CUDA: each process normalises its own bs / N images,
  and the BatchNorm running statistics of rank 0 are broadcast before validation,
- broadcasts the shuffled order with a CPU tensor where fastai uses a CUDA one.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from fastai.callback.progress import ProgressCallback
from fastai.distributed import DistributedDL, DistributedTrainer
from fastai.learner import Learner
from fastcore.basics import noop

from .config import ConfigError, RunConfig


def world_size() -> int:
    """How many processes train this run (WORLD_SIZE set by torchrun or accelerate, else 1)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 in a one-process run)."""
    return int(os.environ.get("RANK", "0"))


def prepare_process(config: RunConfig) -> None:
    """Check that `--bs` splits over the processes and pin this process to its GPU, if any."""
    processes = world_size()
    if processes > 1 and config.bs % processes:
        lower = config.bs - config.bs % processes
        raise ConfigError(
            f"--bs {config.bs} does not split evenly over {processes} processes; "
            f"pass a multiple of {processes}, e.g. --bs {lower or processes}"
        )
    if processes > 1 and torch.cuda.is_available():
        # before the DataLoaders are built, so each process keeps its data on its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def data_parallel(learn: Learner, config: RunConfig) -> Learner:
    """Add DistributedDataParallel training to `learn` when several processes run; else no-op."""
    if world_size() == 1:
        return learn
    on_cuda = learn.dls.device.type == "cuda"
    learn.add_cb(ShardTrainer(sync_bn=on_cuda, cpu=not on_cuda))
    if rank() == 0:
        backend = "nccl" if on_cuda else "gloo"
        print(
            f"DistributedDataParallel over {world_size()} processes ({backend}): "
            f"{config.bs // world_size()} images per process per step, global batch {config.bs}"
        )
    if rank():
        learn.remove_cb(ProgressCallback)
        # every process draws the same crops from the same seed otherwise
        torch.manual_seed(config.seed + rank())
    return learn


class ShardDL(DistributedDL):
    """fastai's `DistributedDL` that also runs on gloo and counts batches of the shard."""

    def _broadcast(self, values: list[int], source: int) -> list[int]:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl moves CUDA tensors only
        tensor = torch.tensor(values, dtype=torch.long, device=device)
        dist.broadcast(tensor, source)
        return tensor.cpu().tolist()

    def __len__(self) -> int:
        # one shard holds ceil(n / world) items cut into batches of this process's bs; fastai
        # divides the full loader's batch count instead, which is wrong once bs is per process
        shard = math.ceil(len(self.dl.dataset) / self.world_size)
        return shard // self.bs if self.drop_last else math.ceil(shard / self.bs)


class ShardTrainer(DistributedTrainer):
    """Train on shards of bs / world images per process; validate the whole set everywhere."""

    def before_fit(self) -> None:
        model = self.model
        if self.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.learn.model = self.accelerator.prepare(model)
        self.old_dls = list(self.dls)
        train = self.dls.train
        shard = ShardDL(train.new(bs=train.bs // self.accelerator.num_processes))
        self.learn.dls.loaders = [shard, *self.old_dls[1:]]
        if rank():
            self.learn.logger = noop

    def before_train(self) -> None:
        pass  # the training loader was wrapped in before_fit

    def before_validate(self) -> None:
        # Without SyncBatchNorm each process updated its running statistics on its own images;
        # evaluate rank 0's everywhere, so every process reports the same metrics
        for buffer in self.learn.model.buffers():
            dist.broadcast(buffer, 0)
