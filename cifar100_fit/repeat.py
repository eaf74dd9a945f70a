"""Repeated runs: each epochs setting trained with seeds 0..N-1, resumable like a sweep."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, make_config
from .trials import RUNNING, done, identity_flags, open_state, run_trial, save_state


def parse_epochs(value: Any) -> list[int]:
    """`30,50` (which fire hands over as a tuple), `30` or "30, 50" as a list of whole numbers."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        numbers = [float(str(item).strip()) for item in items]
    except ValueError:
        numbers = []
    if (
        not numbers
        or any(isinstance(item, bool) for item in items)
        or not all(n.is_integer() and n >= 1 for n in numbers)
    ):
        raise ConfigError(
            f"--epochs {value!r} is not a list of epoch counts; "
            f"pass whole numbers >= 1 separated by commas, e.g. --epochs 30,50"
        )
    return list(dict.fromkeys(int(n) for n in numbers))


def check_times(times: Any) -> int:
    """The number of seeds per setting, a whole number >= 1."""
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ConfigError(f"--times {times!r} is not accepted; pass a whole number >= 1")
    return times


def repeat_folder(flags: dict[str, Any]) -> Path:
    """`--out`, else runs/repeats/<the shared flags' run name without epochs and seed>."""
    if flags.get("out"):
        return Path(flags["out"])
    config = make_config(**{k: v for k, v in flags.items() if k != "out"})
    name = f"{config.arch}-bs{config.bs}-lr{config.lr:g}-wd{config.wd:g}"
    return (
        Path("runs") / "repeats" / (name if config.subset == 1 else f"{name}-sub{config.subset:g}")
    )


def check_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The run flags shared by every run; seeds and epochs belong to the repeat."""
    if "seed" in flags:
        raise ConfigError("fit repeat trains seeds 0..N-1 (set N with --times); drop --seed")
    make_config(**{k: v for k, v in flags.items() if k != "out"})
    return flags


def run_repeat(
    epochs: list[int],
    times: int,
    flags: dict[str, Any],
    train: Callable[..., dict] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every (epochs, seed) pair not yet finished in the repeat's folder; return the state."""
    from .files import load_cifar100
    from .trials import fit_trial

    folder = repeat_folder(flags)
    state = open_state(folder, "repeat", {"name": folder.name, "flags": identity_flags(flags)})
    wanted = [(e, s) for e in epochs for s in range(times)]
    finished = {(t["epochs"], t["seed"]) for t in done(state)}
    todo = [pair for pair in wanted if pair not in finished]
    if not todo:
        log(f"repeat {folder} already holds all {len(wanted)} runs")
        return state
    data = load_cifar100(flags.get("data") or None)
    for number, (n_epochs, seed) in enumerate(todo, start=1):
        name = f"e{n_epochs}-s{seed}-{len(state['trials']):03d}"
        trial = {"name": name, "epochs": n_epochs, "seed": seed, "params": {}, "status": RUNNING}
        state["trials"].append(trial)
        save_state(folder, state)
        log(f"{folder.name} run {number}/{len(todo)}: {n_epochs} epochs, seed {seed}")
        out = folder / "trials" / name
        config = make_config(**{**flags, "epochs": n_epochs, "seed": seed, "out": str(out)})
        run_trial(
            trial, config, data, train or fit_trial, group=folder.name, name=f"{folder.name}-{name}"
        )
        save_state(folder, state)
        outcome = trial.get("error") or f"top-1 {trial.get('accuracy', float('nan')):.4f}"
        log(f"{folder.name} {name}: {trial['status']}, {outcome}")
    return state
