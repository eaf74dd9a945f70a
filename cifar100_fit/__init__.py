"""Train ResNet18 on CIFAR-100 with fastai and timm, log to W&B, sweep and repeat experiments."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["cifar100_learner", "cifar100_dls", "RunConfig", "fit_run"]


def __getattr__(name: str) -> Any:
    # torch, fastai and timm take seconds to import: load them on first use, so that the CLI
    # answers --help and rejects bad flags at once.
    if name in ("cifar100_learner", "fit_run"):
        from . import train

        return getattr(train, name)
    if name == "cifar100_dls":
        from .data import cifar100_dls

        return cifar100_dls
    if name == "RunConfig":
        from .config import RunConfig

        return RunConfig
    raise AttributeError(f"module 'cifar100_fit' has no attribute {name!r}")
