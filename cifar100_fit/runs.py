"""Run folders: where a run writes, what an earlier run left there, and the closing summary line.

Light on imports, so the CLI can refuse an unusable folder before torch loads.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig

CONFIG_FILE, SUMMARY_FILE, WEIGHTS_FILE = "config.json", "summary.json", "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
# Keys that say where things go or how they are logged; changing them does not change a run.
PLACEMENT_KEYS = ("data", "out", "wandb", "project")


class CheckpointError(ConfigError):
    """A checkpoint or weights file that cannot be used: corrupt, unsafe, or of another run."""


def is_main_process() -> bool:
    """Whether this process prints and writes: the only one, or rank 0 under torchrun/accelerate."""
    return int(os.environ.get("RANK", "0")) == 0


def out_folder(config: RunConfig) -> Path:
    """The run's folder: `--out`, else runs/<run name>, or runs/sweeps/<id>/<run> under an agent."""
    if config.out:
        return Path(config.out)
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep_id and run_id:  # two proposals of one sweep may share lr and wd, never a run id
        return Path("runs") / "sweeps" / sweep_id / run_id
    return Path("runs") / config.run_name


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write` on a temporary file beside `path`, then rename it over `path`."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, content: dict) -> None:
    """Write `content` as indented JSON to `path`, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n"))


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when there is none."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{path} is not valid JSON ({error}); move it away and run again"
        ) from None


def config_differences(saved: dict, config: RunConfig) -> list[str]:
    """The keys whose values differ between a saved config and `config`, placement keys aside."""
    current = config.to_dict()
    keys = (set(saved) | set(current)) - set(PLACEMENT_KEYS)
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def prepare_out(config: RunConfig) -> dict | None:
    """Check the run folder before any work: writable, and not holding a different run.

    Returns the summary of a finished run of the same config, or None when there is work to do.
    """
    out = out_folder(config)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {out} cannot be created ({error.strerror})") from None
    _check_writable(out)
    saved = read_json(out / CONFIG_FILE)
    if saved is not None:
        differing = config_differences(saved, config)
        if differing:
            changes = ", ".join(
                f"{k} {saved.get(k)!r} -> {getattr(config, k, None)!r}" for k in differing
            )
            raise ConfigError(
                f"--out {out} holds a run with another config ({changes}); "
                f"pass another --out or move that folder away"
            )
    return read_json(out / SUMMARY_FILE)


def _check_writable(out: Path) -> None:
    # os.access says yes to root even on a read-only mount, so write and remove a probe file
    try:
        handle, probe = tempfile.mkstemp(dir=out, prefix=".write-probe-")
    except OSError as error:
        raise ConfigError(
            f"--out {out} is not writable ({error.strerror}); pass a folder you can write to"
        ) from None
    os.close(handle)
    os.unlink(probe)


def summary_line(summary: dict) -> str:
    """One line that closes a run: accuracies, epochs, wall time and where the results are."""
    line = (
        f"top-1 {summary['accuracy']:.2%}  top-5 {summary['top5_accuracy']:.2%}  "
        f"best top-1 {summary['best_accuracy']:.2%}  {summary['epochs']} epochs  "
        f"{summary['wall_s']:.1f} s  saved in {summary['out']}"
    )
    if summary.get("compile_s"):
        line = line.replace(" s  saved in", f" s (+{summary['compile_s']:.1f} s compile)  saved in")
    if summary.get("wandb_offline_dir"):
        line += (
            f"  W&B offline run: {summary['wandb_offline_dir']} (upload: wandb sync <that folder>)"
        )
    return line
