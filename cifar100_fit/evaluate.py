"""Evaluate saved weights (a run's model.pt or checkpoint.pt) on the CIFAR-100 test images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from fastai.torch_core import default_device

from .checkpoint import load_checkpoint
from .config import make_config
from .data import cifar100_dls
from .files import load_cifar100
from .model import create_model
from .runs import CONFIG_FILE, CheckpointError, read_json


@dataclass
class Evaluation:
    """Accuracies of one model on the test images."""

    accuracy: float
    top5_accuracy: float
    images: int
    tta: bool
    path: str

    @property
    def line(self) -> str:
        """One line for people."""
        mode = " with flip TTA" if self.tta else ""
        return (
            f"top-1 {self.accuracy:.2%}  top-5 {self.top5_accuracy:.2%}  on {self.images} "
            f"test images{mode}  ({self.path})"
        )


def weights_and_config(path: str | Path) -> tuple[dict, dict]:
    """The model state dict in `path` and the run config it belongs to."""
    path = Path(path)
    saved = load_checkpoint(path)
    if isinstance(saved, dict) and "model" in saved and "config" in saved:  # a checkpoint
        return saved["model"], saved["config"]
    config = read_json(path.parent / CONFIG_FILE)
    if config is None:
        raise CheckpointError(
            f"{path.parent / CONFIG_FILE} not found: weights need the run's config.json beside them"
        )
    if not isinstance(saved, dict) or not all(torch.is_tensor(v) for v in saved.values()):
        raise CheckpointError(f"{path} holds no model state dict (name -> tensor)")
    return saved, config


def evaluate_file(
    path: str | Path, tta: bool | None = None, data: str = "", bs: int = 0
) -> Evaluation:
    """Top-1/top-5 accuracy of the weights in `path` on the run's test images (its --subset).

    `tta` None evaluates as the run did (its `--tta`), so the figures match its last epoch.
    """
    state, saved_config = weights_and_config(path)
    config = make_config(**{**saved_config, "data": data or saved_config.get("data", "")})
    tta = config.tta if tta is None else tta
    model = create_model(config.arch)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit {config.arch}: {error}") from None
    device = default_device()
    dls = cifar100_dls(
        bs or config.bs, config.subset, "test", "none", load_cifar100(config.data or None), device
    )
    model = model.to(device).eval()
    correct1 = correct5 = count = 0
    with torch.no_grad():
        for images, labels in dls.valid:
            images, labels = images.as_subclass(torch.Tensor), labels.as_subclass(torch.Tensor)
            scores = model(images)
            if tta:  # the mean logits of the image and its mirror, as `FlipTTA` in training
                scores = (scores + model(images.flip(-1))) / 2
            top5 = scores.topk(5, dim=-1).indices
            correct1 += int((top5[:, 0] == labels).sum())
            correct5 += int((top5 == labels[:, None]).any(-1).sum())
            count += len(labels)
    return Evaluation(correct1 / count, correct5 / count, count, tta, str(path))
