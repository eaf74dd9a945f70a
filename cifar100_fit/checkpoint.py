"""Per-epoch checkpoints: what a run needs to continue exactly where it stopped, loaded safely.

A checkpoint holds the model and optimizer state, the epoch (which fixes the one-cycle schedule
position), the RNG states of every process, the epoch history and the W&B run id and step.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import wandb
from fastai.callback.core import Callback
from fastai.callback.wandb import WandbCallback
from fastai.learner import Learner

from .config import RunConfig
from .model import unwrapped
from .runs import (
    CheckpointError,
    atomic_write,
    config_differences,
    is_main_process,
    read_json,
    write_json,
)
from .tracking import start_run

FORMAT = 1
# Written when an interrupted run finished its W&B run cleanly: how many epochs W&B holds.
WANDB_KEPT_FILE = "wandb-kept.json"
KEYS = ("format", "config", "epoch", "n_epoch", "model", "opt", "rng", "history", "wandb")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; `epochs_done` epochs are saved in the checkpoint."""

    def __init__(self, out: Path, epochs_done: int, epochs: int):
        super().__init__(out, epochs_done, epochs)
        self.out, self.epochs_done, self.epochs = out, epochs_done, epochs


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint or weights file without running any code stored in it."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except pickle.UnpicklingError as error:
        # weights-only loading names a refused import ("Unsupported global"); an opcode it does
        # not know ("Unsupported operand") means bytes that are no pickle at all
        if "unsupported operand" not in str(error).lower():
            raise CheckpointError(
                f"{path} refused: it holds Python objects that would run code when loaded; "
                "only tensors and plain values are accepted"
            ) from None
        raise CheckpointError(
            f"{path} is corrupt or not a checkpoint (no valid pickle); "
            "delete it to start the run again"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({_first_line(error)}); "
            "delete it to start the run again"
        ) from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_run_checkpoint(path: Path, config: RunConfig) -> dict[str, Any]:
    """Load the checkpoint of a run, refusing one of another format or another config."""
    state = load_checkpoint(path)
    missing = [k for k in KEYS if k not in state] if isinstance(state, dict) else list(KEYS)
    if missing or state["format"] != FORMAT:
        raise CheckpointError(
            f"{path} is not a cifar100_fit checkpoint of format {FORMAT} "
            f"(missing: {', '.join(missing) or 'none'}); delete it to start the run again"
        )
    differing = config_differences(state["config"], config)
    if differing:
        changes = ", ".join(
            f"{k} {state['config'].get(k)!r} -> {getattr(config, k, None)!r}" for k in differing
        )
        raise CheckpointError(
            f"{path} belongs to a run with another config ({changes}); "
            "pass the same flags, or another --out"
        )
    return state


def rng_state(learn: Learner) -> dict[str, Any]:
    """This process's random states: torch (CPU and CUDA), numpy, Python and each DataLoader's."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        numpy=[kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        python=random.getstate(),
        loaders=[unwrapped_dl(dl).rng.getstate() for dl in learn.dls.loaders],
    )


def set_rng_state(learn: Learner, state: dict[str, Any]) -> None:
    """Restore the states saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    for dl, saved in zip(learn.dls.loaders, state["loaders"]):
        version, internal, gauss_next = saved
        unwrapped_dl(dl).rng.setstate((version, tuple(internal), gauss_next))


def plain(value: Any) -> Any:
    """`value` with numpy scalars made Python numbers, which a weights-only load accepts."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value


def unwrapped_dl(dl):
    """The DataLoader inside a distributed wrapper (or the DataLoader itself)."""
    return getattr(dl, "dl", dl)


def _all_ranks(value: Any) -> list[Any]:
    """`value` from every process, in rank order (a one-item list without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class Checkpointer(Callback):
    """Save a checkpoint after every epoch (rank 0 writes) and continue from one at `before_fit`.

    Saves after the Recorder (50) has the epoch's metrics and before the W&B logger (51) logs
    them, so W&B never shows an epoch that a resumed run would train again.
    """

    order = 50.5

    def __init__(self, path: Path, config: RunConfig, wandb_id: str, state: dict | None = None):
        self.path, self.config, self.wandb_id, self.state = path, config, wandb_id, state
        self.wall_before = float(state.get("wall_s", 0.0)) if state else 0.0
        self.epochs_done, self.start = self.first_epoch, time.perf_counter()
        self.epoch_steps = list(state["wandb"].get("epoch_steps", [])) if state else []

    @property
    def first_epoch(self) -> int:
        """The epoch this fit starts at: one after the checkpoint's, else 0."""
        return self.state["epoch"] + 1 if self.state else 0

    def before_fit(self) -> None:
        self.start = time.perf_counter()
        # fastai finds `n_inp` by pushing one item through the training transforms (drawing
        # crop/flip random numbers) the first time a batch is split; force that now, before
        # any RNG restore, or a resumed run draws it inside its first epoch and diverges
        _ = unwrapped_dl(self.learn.dls.train).n_inp
        if not self.state:
            return
        state = self.state
        unwrapped(self.learn.model).load_state_dict(state["model"])
        self.learn.opt.load_state_dict(state["opt"])
        recorder = self.learn.recorder
        recorder.values = [list(values) for values in state["history"]["values"]]
        recorder.smooth_loss.count = state["history"]["smooth_count"]
        recorder.smooth_loss.val = state["history"]["smooth_val"]

    def _log_lost_epochs(self) -> None:
        """Log again the saved epochs' rows that no W&B file or server holds.

        wandb-core buffers an offline run's file, so a SIGKILL loses the whole session's rows; a
        clean interrupt writes WANDB_KEPT_FILE. Steps the server already has are skipped.
        """
        kept = read_json(self.path.parent / WANDB_KEPT_FILE) or {}
        kept_epochs = kept.get("epochs", 0) if kept.get("id") == self.wandb_id else 0
        names = self.learn.recorder.metric_names[1:-1]
        steps, rows = self.state["wandb"]["epoch_steps"], self.state["history"]["values"]
        for epoch, (step, values) in enumerate(zip(steps, rows)):
            if epoch >= kept_epochs and step >= wandb.run.step:
                wandb.log({"epoch": epoch + 1, **dict(zip(names, values))}, step=step)
        wandb.run.log({}, commit=True)

    def before_epoch(self) -> None:
        if not (self.state and self.epoch == self.first_epoch):
            return
        # the W&B logger and the progress bar set themselves up in before_fit, after this
        # callback's (order 51 and 60): continue their counts here
        logger = self._wandb_logger()
        if logger is not None:
            logger._wandb_step, logger._wandb_epoch = self.state["wandb"]["step"], self.epoch
            self._log_lost_epochs()
        mbar = getattr(getattr(self.learn, "progress", None), "mbar", None)
        if mbar is not None:
            mbar.update(0)  # the epoch bar must start at 0 before it can jump to first_epoch
        # the RNG states are those right after the saved epoch: restore them last, after all
        # setup that draws random numbers
        ranks = self.state["rng"]
        set_rng_state(self.learn, ranks[_rank() if _rank() < len(ranks) else 0])

    def after_epoch(self) -> None:
        rng = _all_ranks(rng_state(self.learn))
        logger = self._wandb_logger()
        if logger is not None:
            self.epoch_steps.append(logger._wandb_step)
        if is_main_process():
            atomic_write(self.path, lambda tmp: torch.save(self._state(rng), tmp))
        self.epochs_done = self.epoch + 1

    def _state(self, rng: list[dict]) -> dict[str, Any]:
        recorder, logger = self.learn.recorder, self._wandb_logger()
        return dict(
            format=FORMAT,
            config=self.config.to_dict(),
            epoch=self.epoch,
            n_epoch=self.n_epoch,
            pct_train=(self.epoch + 1) / self.n_epoch,
            model=unwrapped(self.learn.model).state_dict(),
            opt=plain(self.learn.opt.state_dict()),
            rng=rng,
            history=dict(
                values=[[float(v) for v in values] for values in recorder.values],
                smooth_count=recorder.smooth_loss.count,
                smooth_val=recorder.smooth_loss.val,
            ),
            wandb=dict(
                id=self.wandb_id,
                step=logger._wandb_step if logger else -1,
                epoch_steps=list(self.epoch_steps),
            ),
            wall_s=self.wall_s,
        )

    @property
    def wall_s(self) -> float:
        """Seconds of training so far, over every session of this run."""
        return self.wall_before + time.perf_counter() - self.start

    def _wandb_logger(self) -> WandbCallback | None:
        return next((cb for cb in self.learn.cbs if isinstance(cb, WandbCallback)), None)


def start_or_resume(
    learn: Learner, config: RunConfig, path: Path, **init_kwargs: Any
) -> tuple[Checkpointer, wandb.Run | None]:
    """The checkpoint callback for `learn` and the W&B run (rank 0 only), resumed from `path`.

    A resumed run logs into the same W&B run (resume by id) and starts after the saved epoch.
    """
    state = load_run_checkpoint(path, config) if path.exists() else None
    # a W&B sweep agent names the run itself (WANDB_RUN_ID); else a fresh id, kept for resuming
    given = init_kwargs.pop("id", None) or os.environ.get("WANDB_RUN_ID")
    wandb_id = state["wandb"]["id"] if state else given or uuid.uuid4().hex[:12]
    checkpoint = Checkpointer(path, config, wandb_id, state)
    learn.first_epoch = checkpoint.first_epoch
    if state and is_main_process():
        print(
            f"resuming from {path}: epochs 1-{checkpoint.first_epoch} of {config.epochs} done, "
            f"continuing with epoch {checkpoint.first_epoch + 1}"
        )
    if not is_main_process():
        return checkpoint, None
    run = start_run(config, path.parent, id=wandb_id, resume="allow", **init_kwargs)
    return checkpoint, run


class WandbRowSent(Callback):
    """Send each epoch's W&B row at once (W&B holds a step's row until the next step) and count
    the rows sent, so an interrupted run can say which epochs its W&B files hold."""

    order = 52  # after the W&B logger's after_epoch

    def __init__(self, first_epoch: int):
        self.epochs_sent = first_epoch

    def after_epoch(self) -> None:
        wandb.run.log({}, commit=True)
        self.epochs_sent = self.epoch + 1


def note_wandb_kept(out: Path, wandb_id: str, epochs: int) -> None:
    """Record that the W&B files hold the rows of `epochs` epochs (after a clean finish)."""
    write_json(out / WANDB_KEPT_FILE, dict(id=wandb_id, epochs=epochs))


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (what schedulers send on preemption) like Ctrl-C while the block runs."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
