"""The `fit sweep`, `fit agent`, `fit repeat` and `fit report` commands: check, then wire parts.

Every argument is checked before torch, fastai or wandb load, so bad input fails in a moment.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from .config import ConfigError
from .repeat import check_flags, check_times, parse_epochs, repeat_folder, run_repeat
from .report import report
from .sweep import CONTROLLERS, load_sweep, run_flags, sweep_folder


def check_count(count: Any, zero_ok: bool = False, flag: str = "--count") -> int:
    """A trial count: a whole number >= 1 (>= 0 where 0 means no limit)."""
    low = 0 if zero_ok else 1
    if isinstance(count, bool) or not isinstance(count, int) or count < low:
        raise ConfigError(f"{flag} {count!r} is not accepted; pass a whole number >= {low}")
    return count


def sweep_command(config: str, count: Any, controller: str, flags: dict[str, Any]) -> None:
    """`fit sweep`: the local controller, or a sweep created and run on W&B's server."""
    count = check_count(count)
    if controller not in ("", *CONTROLLERS):
        raise ConfigError(
            f"--controller {controller!r} is not accepted; choose one of: {', '.join(CONTROLLERS)}"
        )
    sweep_config = load_sweep(config)
    run_flags(config, sweep_config, flags)
    if (controller or _default_controller(flags)) == "wandb":
        from .sweep import cloud_agent, cloud_sweep

        sweep_id = cloud_sweep(config, count, flags)
        print(f"W&B sweep {sweep_id}: more machines join with `fit agent {sweep_id}`")
        cloud_agent(sweep_id, count, flags)
        return
    from .sweep import local_sweep

    state = local_sweep(config, count, flags)
    print(report(sweep_folder(config, flags)))
    if state.get("stopped_because"):
        print(f"fit sweep: stopped, {state['stopped_because']}", file=sys.stderr)
        sys.exit(1)


def _default_controller(flags: dict[str, Any]) -> str:
    if flags.get("wandb") in ("offline", "disabled"):
        return "local"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # importing fastai warns about torch.jit; not ours to fix
        from .tracking import logged_in, resolve_mode

    return "wandb" if logged_in() and resolve_mode(flags.get("wandb", "")) == "online" else "local"


def agent_command(sweep_id: str, count: Any, flags: dict[str, Any]) -> None:
    """`fit agent`: train the runs W&B's server proposes for `sweep_id`."""
    from .sweep import cloud_agent

    count = check_count(count, zero_ok=True)
    cloud_agent(str(sweep_id), count or None, flags)


def repeat_command(epochs: Any, times: Any, flags: dict[str, Any]) -> None:
    """`fit repeat`: every epochs setting x seeds 0..times-1, then the table and box plot."""
    epochs, times = parse_epochs(epochs), check_times(times)
    check_flags(flags)
    state = run_repeat(epochs, times, flags)
    print(report(repeat_folder(flags)))
    failed = [t for t in state["trials"] if t["status"] == "failed"]
    if failed:
        print(f"fit repeat: {len(failed)} runs failed; see report.md", file=sys.stderr)


def report_command(folder: str, top: Any) -> None:
    """`fit report`: print and write the report of a sweep or repeat folder."""
    top = check_count(top, flag="--top")
    print(report(folder, top))
