"""Reports of a sweep or repeat folder: a terminal table, report.md and PNG plots."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .config import ConfigError
from .runs import read_json
from .trials import FAILED, FINISHED, STOPPED

REPORT_FILE, SCATTER_FILE, BOX_FILE = "report.md", "lr_wd.png", "box.png"


def load_study(folder: str | Path) -> dict[str, Any]:
    """The state of the sweep or repeat in `folder`."""
    folder = Path(folder)
    for kind in ("sweep", "repeat"):
        state = read_json(folder / f"{kind}.json")
        if state is not None:
            return state
    raise ConfigError(
        f"{folder} holds no sweep.json or repeat.json; pass a `fit sweep` or "
        f"`fit repeat` folder such as runs/sweeps/bs256-e30"
    )


def report(folder: str | Path, top: int = 10) -> str:
    """Write report.md and the PNG plot of the study in `folder`; return the markdown."""
    folder = Path(folder)
    state = load_study(folder)
    if state["kind"] == "sweep":
        text = sweep_markdown(state, top)
        if _done(state):
            scatter_plot(state, folder / SCATTER_FILE)
            text += f"\n![lr vs wd]({SCATTER_FILE})\n"
    else:
        text = repeat_markdown(state)
        if _done(state):
            box_plot(state, folder / BOX_FILE)
            text += f"\n![final accuracy per setting]({BOX_FILE})\n"
    (folder / REPORT_FILE).write_text(text)
    return text


def _done(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in state["trials"] if t["status"] in (FINISHED, STOPPED)]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table that also reads well as plain text in a terminal."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join(
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines
    )


def sweep_markdown(state: dict[str, Any], top: int = 10) -> str:
    """The sweep's best trials by its metric, best first, and a count of every status."""
    config = state["sweep_config"]
    metric, goal = config["metric"]["name"], config["metric"].get("goal", "maximize")
    trials = sorted(_done(state), key=lambda t: t[metric], reverse=goal == "maximize")
    searched = [k for k, v in config["parameters"].items() if "value" not in v]
    header = ["trial", *searched, metric, "best_accuracy", "epochs", "status", "wall_s"]
    rows = [
        [
            t["name"],
            *(f"{t['params'].get(k, ''):g}" for k in searched),
            f"{t[metric]:.4f}",
            f"{t.get('best_accuracy', math.nan):.4f}",
            str(len(t.get("history", []))),
            t["status"],
            f"{t.get('wall_s', math.nan):.1f}",
        ]
        for t in trials[:top]
    ]
    failed = [t for t in state["trials"] if t["status"] == FAILED]
    notes = ["", "Failed trials:", ""] if failed else []
    notes += [f"- {t['name']} {_params(t['params'])}: {t.get('error', '')}" for t in failed]
    return _document(
        f"# Sweep {state['name']}",
        f"{config['method']} search, {metric} ({goal}); trials: {_status_counts(state)}.",
        f"Flags shared by every trial: {_flags(state['flags'])}.",
        markdown_table(header, rows) if rows else "No finished trial yet.",
        notes,
    )


def _document(title: str, summary: str, flags: str, table: str, notes: list[str]) -> str:
    return "\n".join([title, "", summary, flags, "", table, *notes]) + "\n"


def _status_counts(state: dict[str, Any]) -> str:
    statuses = [t["status"] for t in state["trials"]]
    return ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses)) or "none"


def _flags(flags: dict[str, Any]) -> str:
    return " ".join(f"--{k} {v}" for k, v in flags.items()) or "(defaults)"


def _params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def repeat_settings(state: dict[str, Any]) -> dict[str, list[float]]:
    """Final accuracy of each finished trial, by setting, settings in epoch order."""
    settings: dict[str, list[float]] = {}
    for trial in sorted(_done(state), key=lambda t: (t["epochs"], t["seed"])):
        settings.setdefault(f"{trial['epochs']} epochs", []).append(trial["accuracy"])
    return settings


def repeat_markdown(state: dict[str, Any]) -> str:
    """Mean, std, min and max of the final accuracy of each setting of a repeat."""
    rows = [
        [
            setting,
            str(len(values)),
            f"{statistics.fmean(values):.4f}",
            f"{statistics.stdev(values):.4f}" if len(values) > 1 else "-",
            f"{min(values):.4f}",
            f"{max(values):.4f}",
        ]
        for setting, values in repeat_settings(state).items()
    ]
    header = ["setting", "runs", "mean", "std", "min", "max"]
    failed = [t for t in state["trials"] if t["status"] == FAILED]
    return _document(
        f"# Repeat {state['name']}",
        f"Final top-1 accuracy over seeds 0..N-1; trials: {_status_counts(state)}.",
        f"Flags shared by every run: {_flags(state['flags'])}.",
        markdown_table(header, rows) if rows else "No finished run yet.",
        [f"- failed: {t['name']}: {t.get('error', '')}" for t in failed],
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def scatter_plot(state: dict[str, Any], path: Path) -> None:
    """lr against wd on log axes, each finished trial coloured by the sweep's metric."""
    plt = _pyplot()
    metric = state["sweep_config"]["metric"]["name"]
    trials = [t for t in _done(state) if t["params"].get("lr", 0) > 0]
    lr = [t["params"].get("lr", state["flags"].get("lr")) for t in trials]
    wd = [t["params"].get("wd", state["flags"].get("wd")) for t in trials]
    # wd 0 is a legal draw of q_log_normal; it cannot sit on a log axis, so it goes at the floor
    floor = min([w for w in wd if w and w > 0] or [1e-3]) / 2
    wd = [w if w and w > 0 else floor for w in wd]
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    points = axes.scatter(lr, wd, c=[t[metric] for t in trials], cmap="viridis", s=60)
    figure.colorbar(points, ax=axes, label=metric)
    axes.set(xscale="log", yscale="log", xlabel="lr (peak, one-cycle)", ylabel="wd")
    axes.set_title(f"sweep {state['name']}: {len(trials)} trials")
    best = max(trials, key=lambda t: t[metric], default=None)
    if best is not None:
        axes.annotate("best", (best["params"].get("lr"), best["params"].get("wd") or floor))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def box_plot(state: dict[str, Any], path: Path) -> None:
    """One box of final top-1 accuracy per setting, with every run drawn as a dot."""
    plt = _pyplot()
    settings = repeat_settings(state)
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    axes.boxplot(list(settings.values()))
    axes.set_xticks(
        range(1, len(settings) + 1), list(settings)
    )  # boxplot's own keyword was renamed
    for position, values in enumerate(settings.values(), start=1):
        axes.plot([position] * len(values), values, "o", alpha=0.5, color="tab:blue")
    axes.set(ylabel="final top-1 accuracy", title=f"repeat {state['name']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
