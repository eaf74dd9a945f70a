"""W&B runs: online or offline, a run started with the resolved config, and the fastai callback."""

from __future__ import annotations

import json
import netrc
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

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


class OfflineRun(NamedTuple):
    """What an offline W&B run recorded: its config, logged rows, final summary and exit code."""

    config: dict
    history: list[dict]
    summary: dict
    exit_code: int | None


# The .wandb file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of records,
# each with a 7-byte header (CRC32, little-endian length, kind); a record that does not fit a
# block continues in the next one (kinds: 1 whole, 2 first, 3 middle, 4 last).
_BLOCK, _HEADER = 32768, 7


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Read the config, history and summary that an offline run folder holds."""
    from wandb.proto import wandb_internal_pb2

    (log_file,) = Path(run_dir).glob("run-*.wandb")
    config, history, summary, exit_code = {}, [], {}, None
    for payload in _log_records(log_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update(_items(record.run.config.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return OfflineRun(config, history, summary, exit_code)


def _items(items) -> dict:
    values = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        values[key] = json.loads(item.value_json)
    return values


def _log_records(data: bytes):
    position, pieces = _HEADER, []
    while position + _HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _HEADER:  # block trailer too small for a header: skip it
            position += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, position + 4)
        start = position + _HEADER
        pieces.append(data[start : start + length])
        position = start + length
        if kind in (1, 4):
            yield b"".join(pieces)
            pieces = []
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            position += _BLOCK - position % _BLOCK if position % _BLOCK else 0
