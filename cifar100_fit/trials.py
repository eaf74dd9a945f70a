"""Study folders shared by sweeps and repeats: one JSON state file, and trials that cannot crash it.

A study folder holds `<kind>.json` (the study's identity and every trial's record) and one run
folder per trial under `trials/`. The state file is rewritten atomically after each change, so a
kill at any moment leaves either the old or the new state, never a torn file.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig
from .runs import CONFIG_FILE, PLACEMENT_KEYS, read_json, write_json

FINISHED, STOPPED, FAILED, RUNNING, INTERRUPTED = (
    "finished",
    "stopped",
    "failed",
    "running",
    "interrupted",
)
# Summary keys kept in a trial's record; weights and W&B files stay in the trial's run folder.
RECORD_KEYS = (
    "accuracy",
    "top5_accuracy",
    "best_accuracy",
    "valid_loss",
    "wall_s",
    "history",
    "out",
    "wandb_offline_dir",
    "wandb_url",
)


def identity_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The run flags that change what a trial computes (where it logs or reads data aside)."""
    return {k: v for k, v in sorted(flags.items()) if k not in PLACEMENT_KEYS}


def open_state(folder: Path, kind: str, identity: dict[str, Any]) -> dict[str, Any]:
    """Load the study in `folder`, or start one; refuse a folder that holds a different study.

    Trials left `running` by a killed process are marked `interrupted`: they are kept for the
    record, never reused, and their run folders are not written again.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {folder} cannot be created ({error.strerror})") from None
    if (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"--out {folder} holds a `fit run` run, not a {kind}; pass another --out")
    path = folder / f"{kind}.json"
    other = [p.name for p in folder.glob("*.json") if p.name in ("sweep.json", "repeat.json")]
    if other and other != [path.name]:
        raise ConfigError(
            f"--out {folder} holds a {other[0][:-5]}, not a {kind}; pass another --out"
        )
    state = read_json(path)
    if state is None:
        state = {"kind": kind, **identity, "trials": []}
        write_json(path, state)
        return state
    differing = sorted(k for k in identity if state.get(k) != identity[k])
    if differing:
        changes = "; ".join(f"{k}: {state.get(k)!r} -> {identity[k]!r}" for k in differing)
        raise ConfigError(
            f"--out {folder} holds a {kind} with another setup ({changes}); "
            f"pass another --out or move that folder away"
        )
    for trial in state["trials"]:
        if trial["status"] == RUNNING:
            trial["status"] = INTERRUPTED
    write_json(path, state)
    return state


def save_state(folder: Path, state: dict[str, Any]) -> None:
    """Write the study's state file atomically."""
    write_json(folder / f"{state['kind']}.json", state)


def done(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials that trained to the end or were stopped early by the sweep's rule."""
    return [t for t in state["trials"] if t["status"] in (FINISHED, STOPPED)]


def run_trial(
    trial: dict[str, Any],
    config: RunConfig,
    data: Any,
    train: Callable[..., dict],
    **train_kwargs: Any,
) -> None:
    """Train `config` and store the outcome in `trial`; an exception marks the trial failed.

    The sweep must outlive a trial that raises (a diverging lr, a bad value, a bug in a
    callback), so any `Exception` is recorded with its message and the last traceback line.
    KeyboardInterrupt is not caught: the trial stays `running` and a re-run marks it interrupted.
    """
    start = time.perf_counter()
    try:
        summary = train(config, data, **train_kwargs)
    except Exception as error:  # noqa: BLE001 - recorded, see docstring
        where = traceback.extract_tb(error.__traceback__)[-1]
        trial.update(
            status=FAILED,
            error=f"{type(error).__name__}: {error}".strip(),
            error_at=f"{Path(where.filename).name}:{where.lineno}",
            wall_s=round(time.perf_counter() - start, 2),
        )
        return
    trial.update({k: summary[k] for k in RECORD_KEYS if k in summary})
    trial["status"] = STOPPED if len(summary.get("history", [])) < config.epochs else FINISHED
    if not math.isfinite(trial.get("accuracy", math.nan)):
        trial.update(status=FAILED, error=f"accuracy is {trial.get('accuracy')}")


def fit_trial(config: RunConfig, data: Any, **kwargs: Any) -> dict[str, Any]:
    """The default trainer of a trial: `train.fit_run`, imported when the first trial starts."""
    from .train import fit_run

    Path(config.out).mkdir(parents=True, exist_ok=True)  # fit_run writes config.json first
    return fit_run(config, data, **kwargs)
