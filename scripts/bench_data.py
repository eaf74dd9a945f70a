"""Images/s of the training batch pipeline (gather, crop/flip, normalise) against the model's.

The pipeline must outrun the model by a wide margin, or the GPU waits on data. Both are timed
in one process on the same device, in alternating blocks; the ratio is of the medians.

    python scripts/bench_data.py            # ~1 minute on 2 CPU cores
    python scripts/bench_data.py --quick    # ~20 s

The last line holds `ratio=` (pipeline images/s over model training images/s; goal >= 10).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step_overhead import synthetic_cifar  # noqa: E402

from cifar100_fit.train import cifar100_learner  # noqa: E402


def pipeline_images_per_s(learn, batches: int) -> float:
    """Training batches drawn through the Learner's DataLoader, augmentation included."""
    start, images = time.perf_counter(), 0
    for i, (x, _) in enumerate(learn.dls.train):
        images += len(x)
        if i + 1 == batches:
            break
    if x.is_cuda:
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def model_images_per_s(learn, batches: int) -> float:
    """Forward, backward and AdamW step of the model on one fixed, ready batch."""
    x, y = (t.as_subclass(torch.Tensor) for t in learn.dls.train.one_batch())
    learn.model.train()
    optimizer = torch.optim.AdamW(learn.model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(batches):
        learn.loss_func(learn.model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    return batches * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter blocks")
    parser.add_argument("--bs", type=int, default=64)
    args = parser.parse_args()
    pairs, data_batches, model_batches = (2, 20, 1) if args.quick else (5, 50, 3)
    data = synthetic_cifar(args.bs * data_batches, 100)
    learn = cifar100_learner(data=data, bs=args.bs, aug="crop_flip", wandb="disabled")
    pipeline_images_per_s(learn, 2)  # warm-up
    model_images_per_s(learn, 1)
    pipeline, model = [], []
    for _ in range(pairs):
        pipeline.append(pipeline_images_per_s(learn, data_batches))
        model.append(model_images_per_s(learn, model_batches))
    pipeline_rate, model_rate = statistics.median(pipeline), statistics.median(model)
    print(
        f"device {learn.dls.device}, bs {args.bs}, {pairs} pairs: pipeline {pipeline_rate:.0f} "
        f"images/s, resnet18_cifar training {model_rate:.1f} images/s"
    )
    print(f"ratio={pipeline_rate / model_rate:.1f}")


if __name__ == "__main__":
    main()
