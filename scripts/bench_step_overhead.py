"""Per-step cost of the project's fastai Learner against a plain PyTorch loop, measured in pairs.

Both sides train the same model from the same weights on the same in-memory uint8 images, with
the same crop/flip + normalisation, loss, torch AdamW and one-cycle schedule (lr and beta1 set
every step), and evaluate the same validation batches. Blocks run A B A B ... in one process, so
slow drift of a shared CPU hits both sides alike; each figure is the median over the pairs.

    python scripts/bench_step_overhead.py            # ~2 minutes on 2 idle CPU cores
    python scripts/bench_step_overhead.py --quick    # under a minute; figures are rough

The last line holds `ratio=` (ResNet18 throughput, Learner over plain loop; 1.0 = no cost) and
`overhead_ms=` (extra milliseconds per training step with a trivial model, where the model costs
almost nothing and the framework shows).
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import statistics
import time
from contextlib import redirect_stdout
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifar100_fit.data import CIFAR100_MEAN, CIFAR100_STD, crop_flip
from cifar100_fit.files import Cifar100, RawSplit
from cifar100_fit.train import ADAM_BETAS, ADAM_EPS, DIV, DIV_FINAL, PCT_START, cifar100_learner

MOMS = (0.95, 0.85, 0.95)  # fastai's default beta1 cycle, which fit_one_cycle applies


@dataclass
class Case:
    """One comparison: a model and how much work each timed block does."""

    name: str
    model: nn.Module
    bs: int
    train_images: int
    valid_images: int
    pairs: int


def synthetic_cifar(train_images: int, valid_images: int, seed: int = 0) -> Cifar100:
    """Random uint8 images with CIFAR-100's shapes; the benchmark measures cost, not learning."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> RawSplit:
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        return RawSplit(pixels, np.arange(n, dtype=np.int64) % 100)

    return Cifar100(split(train_images), split(valid_images), [f"c{i}" for i in range(100)])


def one_cycle(pct: float, low: float, high: float, end: float) -> float:
    """fastai's combined cosine: `low` -> `high` over PCT_START of training, then -> `end`."""
    start, stop, pos = (low, high, pct / PCT_START) if pct < PCT_START else (high, end, 0)
    if pct >= PCT_START:
        pos = (pct - PCT_START) / (1 - PCT_START)
    return start + (1 + math.cos(math.pi * (1 - pos))) * (stop - start) / 2


class PlainLoop:
    """The same training and evaluation as the Learner, written as a plain PyTorch loop."""

    def __init__(self, model: nn.Module, data: Cifar100, bs: int, lr: float, wd: float):
        self.model, self.bs, self.lr = model, bs, lr
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=wd
        )
        self.train = [torch.from_numpy(a) for a in data.train]
        self.valid = [torch.from_numpy(a) for a in data.test]
        mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in (CIFAR100_MEAN, CIFAR100_STD))
        self.shift, self.scale = -mean / std, 1 / (255 * std)

    def normalised(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, images, self.scale)

    def fit(self, epochs: int) -> None:
        """Train `epochs` epochs of the one-cycle schedule, evaluating after each."""
        steps = len(self.train[1]) // self.bs
        for epoch in range(epochs):
            self.train_epoch(epoch, epochs, steps)
            self.evaluate()

    def train_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.model.train()
        pixels, labels = self.train
        order = torch.randperm(len(labels))
        for step in range(steps):
            pct = (epoch * steps + step) / (epochs * steps)
            for group in self.optimizer.param_groups:
                group["lr"] = one_cycle(pct, self.lr / DIV, self.lr, self.lr / DIV_FINAL)
                beta1 = one_cycle(pct, MOMS[0], MOMS[1], MOMS[2])
                group["betas"] = (beta1, group["betas"][1])
            index = order[step * self.bs : (step + 1) * self.bs]
            images = pixels[index].view(-1, 3, 32, 32)
            top, left = torch.randint(0, 9, (2, len(index)))
            images = crop_flip(images, top, left, torch.rand(len(index)) < 0.5)
            output = self.model(self.normalised(images))
            loss = F.cross_entropy(output, labels[index], label_smoothing=0.1)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.model.eval()
        pixels, labels = self.valid
        correct1 = correct5 = torch.zeros(())
        for start in range(0, len(labels), 2 * self.bs):
            images = pixels[start : start + 2 * self.bs].view(-1, 3, 32, 32)
            target = labels[start : start + 2 * self.bs]
            output = self.model(self.normalised(images))
            F.cross_entropy(output, target, label_smoothing=0.1)
            top = output.topk(5, dim=-1).indices
            correct1 = correct1 + (top[:, :1] == target[:, None]).sum()
            correct5 = correct5 + (top == target[:, None]).any(dim=-1).sum()
        return float(correct1) / len(labels), float(correct5) / len(labels)


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def compare(case: Case, lr: float = 0.015, wd: float = 0.18) -> tuple[float, float, int]:
    """Median seconds per block for (Learner, plain loop), and training steps per block."""
    data = synthetic_cifar(case.train_images, case.valid_images)
    # no --tta: the plain loop evaluates each image once
    learn = cifar100_learner(data=data, bs=case.bs, wandb="disabled", lr=lr, wd=wd, tta=False)
    learn.model = copy.deepcopy(case.model)
    plain = PlainLoop(copy.deepcopy(case.model), data, case.bs, lr, wd)
    # the Learner keeps its progress bar and epoch table, as in a real run; only the text is hidden
    with redirect_stdout(io.StringIO()):
        learn.fit_one_cycle(1, lr, wd=wd)  # warm-up: first-call allocations and lazy imports
    plain.fit(1)
    learner_s, plain_s = [], []
    for _ in range(case.pairs):
        with redirect_stdout(io.StringIO()):
            learner_s.append(timed(lambda: learn.fit_one_cycle(1, lr, wd=wd)))
        plain_s.append(timed(lambda: plain.fit(1)))
    return statistics.median(learner_s), statistics.median(plain_s), case.train_images // case.bs


def trivial_model() -> nn.Module:
    """A linear layer on the flattened image: almost no compute, so framework cost shows."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter blocks (< 1 min)")
    # one thread by default: on a shared CPU, extra threads wait on each other at every small op,
    # and that noise would swamp the framework cost this script looks for
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from cifar100_fit.model import create_model

    quick = args.quick
    trivial = Case(
        "trivial", trivial_model(), 64, 64 * (150 if quick else 300), 256, 3 if quick else 7
    )
    resnet = Case(
        "resnet18_cifar", create_model(), 16, 16 * (2 if quick else 6), 32, 2 if quick else 4
    )

    learner_s, plain_s, steps = compare(trivial)
    overhead_ms = (learner_s - plain_s) / steps * 1000
    print(
        f"trivial model, bs {trivial.bs}, {steps} steps/block, {trivial.pairs} pairs: "
        f"Learner {learner_s / steps * 1e3:.3f} ms/step, plain {plain_s / steps * 1e3:.3f} ms/step"
    )
    learner_s, plain_s, steps = compare(resnet)
    ratio = plain_s / learner_s
    images = steps * resnet.bs
    print(
        f"resnet18_cifar, bs {resnet.bs}, {steps} steps/block, {resnet.pairs} pairs: "
        f"Learner {images / learner_s:.1f} images/s, plain {images / plain_s:.1f} images/s"
    )
    print(f"ratio={ratio:.3f} overhead_ms={overhead_ms:.3f}")


if __name__ == "__main__":
    main()
