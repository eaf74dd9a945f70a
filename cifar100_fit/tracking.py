"""W&B runs: online or offline, a run started with the resolved config, and the fastai callback."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

import wandb
from fastai.callback.wandb import WandbCallback

from .config import RunConfig


def logged_in() -> bool:
    """Whether W&B credentials are present (an API key in the environment or in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str = "") -> str:
    """The W&B mode to use: `mode` if given, else $WANDB_MODE, else online when logged in."""
    mode = mode or os.environ.get("WANDB_MODE", "")
    if mode in ("online", "offline", "disabled"):
        return mode
    if mode == "dryrun":  # W&B's old spelling of offline
        return "offline"
    return "online" if logged_in() else "offline"


def start_run(config: RunConfig, out: Path, **init_kwargs: Any) -> wandb.Run:
    """Start a W&B run in `out` whose config is the whole resolved `config`."""
    out.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=config.project,
        name=init_kwargs.pop("name", config.run_name),
        config=config.to_dict(),
        mode=resolve_mode(config.wandb),
        dir=str(out),
        **init_kwargs,
    )


def run_folder(run: wandb.Run) -> str:
    """The local folder of a run's files: what `wandb sync` takes for an offline run."""
    return str(Path(run.dir).parent) if run is not None and not run.disabled else ""


class WandbLogger(WandbCallback):
    """fastai's `WandbCallback` with defaults that suit tensor data sets and a cheap config step.

    - The config is passed to `wandb.init` by `start_run`, so the callback's own config
      gathering (which inspects every callback's `__init__` arguments and fails with
      `TypeError: vars() argument must have __dict__ attribute` on fastai 2.8.9-2.8.12 with
      fastcore >= 2.2.22) is skipped.
    - Predictions are not logged as a table: that path needs item-based data sets.
    - Every `every` steps it logs the losses and the group-0 lr, mom and wd, not every optimizer
      setting: each log reads the loss off the GPU, a sync that stalls the queue of kernels.
    """

    def __init__(self, every: int = 10, **kwargs: Any):
        kwargs.setdefault("log_preds", False)
        kwargs.setdefault("log_model", False)
        super().__init__(**kwargs)
        self.every = every

    def before_fit(self) -> None:
        self.learn.gather_args = dict  # an empty update: the config went to wandb.init already
        try:
            super().before_fit()
        finally:
            del self.learn.gather_args

    def after_batch(self) -> None:
        """Log the training loss and the scheduled lr, mom and wd, every `every` steps."""
        if not self.training:
            return
        self._wandb_step += 1
        self._wandb_epoch += 1 / self.n_iter
        if self._wandb_step % self.every:
            return
        hypers = {k: v for k, v in self.opt.hypers[0].items() if k in ("lr", "mom", "wd")}
        metrics = {
            "epoch": self._wandb_epoch,
            "train_loss": self.smooth_loss,
            "raw_loss": self.loss,
        }
        wandb.log({**metrics, **hypers}, step=self._wandb_step)
