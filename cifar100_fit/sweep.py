"""Sweeps: W&B sweep YAML files, the local Bayes controller, and W&B cloud agents.

The local controller asks W&B's open-source sweep engine (the `sweeps` package) for each trial,
given every trial recorded so far, and trains it in this process as a normal `fit run`. Its state
lives in one folder (see `trials.py`), so a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .config import FLAGS, ConfigError, make_config
from .trials import (
    FAILED,
    FINISHED,
    RUNNING,
    STOPPED,
    done,
    identity_flags,
    open_state,
    run_trial,
    save_state,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sweeps 0.3 declares a pydantic v1 option pydantic v2 renamed
    import sweeps
    from sweeps.config.schema import dereferenced_sweep_config_jsonschema

CONTROLLERS = ("local", "wandb")
LOCAL_METHODS = ("bayes", "random", "grid")
# The summary keys `fit run` writes and that a sweep may optimise.
METRICS = ("accuracy", "top5_accuracy", "best_accuracy", "valid_loss")
# A sweep whose trials all fail (wrong data path, a bug) stops instead of proposing forever.
MAX_FAILURES_IN_A_ROW = 3


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """The sweep YAML at `path`, as loaded, once it passes the sweeps schema and names run flags."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep config {path} not found; pass a YAML file such as configs/*.yaml")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML ({first})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a W&B sweep: expected a mapping with method, parameters")
    problems = schema_problems(config)
    if problems:
        raise ConfigError(f"{path} is not a valid W&B sweep: {'; '.join(problems)}")
    _check_run_flags(path, config)
    return config


def schema_problems(config: dict[str, Any]) -> list[str]:
    """What the sweeps package's schema refuses in `config`, each parameter's fault named."""
    try:
        problems = sweeps.schema_violations_from_proposed_config(config)
    except ValueError as error:
        return [str(error)]
    if any("invalid hyperparameter configuration" in p for p in problems):
        # The schema says only that no distribution matched; find which key the user got wrong.
        problems = [p for p in problems if "is not valid under any of the given schemas" not in p]
        problems = [
            p if not p.startswith("invalid hyperparameter") else _parameter_problem(config, p)
            for p in problems
        ]
    return problems


def _parameter_problem(config: dict[str, Any], problem: str) -> str:
    name = problem.rsplit(":", 1)[-1].strip()
    spec = config["parameters"].get(name)
    schemas = _distribution_schemas()
    given = spec.get("distribution") if isinstance(spec, dict) else None
    if given not in schemas:
        return (
            f"parameter {name}: distribution {given!r} is not accepted "
            f"(one of: {', '.join(sorted(schemas))}; or value: / values:)"
        )
    errors = sorted(jsonschema.Draft7Validator(schemas[given]).iter_errors(spec), key=str)
    details = ", ".join(f"{'.'.join(map(str, e.path)) or 'it'}: {e.message}" for e in errors)
    return f"parameter {name} ({given}): {details}"


def _distribution_schemas() -> dict[str, dict]:
    """Each distribution name of the sweeps schema and the schema of its parameter entry."""
    schemas = {}
    for definition in dereferenced_sweep_config_jsonschema["definitions"].values():
        # some definitions list variants (e.g. uniform with int or float bounds): the first speaks
        definition = definition.get("anyOf", [definition])[0]
        names = definition.get("properties", {}).get("distribution", {}).get("enum", ())
        schemas.update({name: definition for name in names})
    return schemas


def _check_run_flags(path: Path, config: dict[str, Any]) -> None:
    unknown = sorted(set(config["parameters"]) - set(FLAGS))
    if unknown:
        raise ConfigError(
            f"{path}: parameter {', '.join(unknown)} is not a `fit run` flag; "
            f"accepted: {', '.join(FLAGS)}"
        )
    metric = config.get("metric", {}).get("name")
    if metric not in METRICS:
        raise ConfigError(
            f"{path}: metric {metric!r} is not a summary key of `fit run`; "
            f"accepted: {', '.join(METRICS)}"
        )


def fixed_values(config: dict[str, Any]) -> dict[str, Any]:
    """The parameters the sweep does not search: `value: x`."""
    return {k: v["value"] for k, v in config["parameters"].items() if "value" in v}


def run_flags(sweep_path: str, config: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The flags every trial shares: the YAML's fixed values under the command line's flags.

    A flag that the sweep searches is refused: passing it would pin the searched value.
    """
    searched = sorted(set(flags) & (set(config["parameters"]) - set(fixed_values(config))))
    if searched:
        raise ConfigError(
            f"--{searched[0]} is searched by {sweep_path}; drop it, or fix it in a copy of the YAML"
        )
    shared = {**fixed_values(config), **flags}
    make_config(**{k: v for k, v in shared.items() if k != "out"})  # refuse bad values now
    return shared


def sweep_folder(sweep_path: str, flags: dict[str, Any]) -> Path:
    """The sweep's folder: `--out`, else runs/sweeps/<config file stem>."""
    return (
        Path(flags["out"]) if flags.get("out") else Path("runs") / "sweeps" / Path(sweep_path).stem
    )


def trial_params(proposal: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The searched values of a proposed run, as plain numbers snapped to their q grid."""
    params, fixed = {}, fixed_values(config)
    for name, entry in proposal.config.items():
        if name in fixed:
            continue  # the shared flags carry these, overridden from the command line
        value = entry["value"]
        value = value.item() if hasattr(value, "item") else value
        q = config["parameters"].get(name, {}).get("q")
        if isinstance(value, float) and q:
            # the engine returns round(x / q) * q, e.g. 0.41000000000000003 for q 0.01
            decimals = max(0, -math.floor(math.log10(q))) + 6
            value = round(round(value / q) * q, decimals)
        params[name] = value
    return params


def as_sweep_run(trial: dict[str, Any], fixed: dict[str, Any], running: bool = False) -> Any:
    """A recorded trial in the form the sweeps engine reads; `fixed` are the YAML's values."""
    state = "running" if running else ("failed" if trial["status"] == FAILED else "finished")
    summary = {k: trial[k] for k in METRICS if isinstance(trial.get(k), (int, float))}
    return sweeps.SweepRun(
        name=trial["name"],
        state=state,
        config={k: {"value": v} for k, v in {**fixed, **trial["params"]}.items()},
        summary_metrics=summary,
        history=trial.get("history", []),
    )


def propose(config: dict[str, Any], trials: list[dict[str, Any]], index: int) -> dict | None:
    """The next trial's searched values, or None when a grid is exhausted."""
    import numpy as np

    fixed = fixed_values(config)
    known = [as_sweep_run(t, fixed) for t in trials if t["status"] in (FINISHED, STOPPED, FAILED)]
    np.random.seed(index)  # the same history gives the same proposal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proposal = sweeps.next_run(config, known, validate=True)
    return None if proposal is None else trial_params(proposal, config)


def local_sweep(
    sweep_path: str,
    count: int,
    flags: dict[str, Any],
    train: Callable[..., dict] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run trials until the sweep folder holds `count` finished ones; return the state."""
    from .files import load_cifar100
    from .trials import fit_trial

    config = load_sweep(sweep_path)
    shared = run_flags(sweep_path, config, flags)
    folder = sweep_folder(sweep_path, flags)
    identity = {"name": folder.name, "sweep_config": config, "flags": identity_flags(shared)}
    state = open_state(folder, "sweep", identity)
    if len(done(state)) >= count:
        log(f"sweep {folder} already holds {len(done(state))} finished trials")
        return state
    data = load_cifar100(shared.get("data") or None)
    train = train or fit_trial
    failures = 0
    while len(done(state)) < count and failures < MAX_FAILURES_IN_A_ROW:
        index = len(state["trials"])
        params = propose(config, state["trials"], index)
        if params is None:
            log(f"sweep {folder}: the grid is exhausted after {index} trials")
            break
        trial = {"index": index, "name": f"trial-{index:03d}", "params": params, "status": RUNNING}
        state["trials"].append(trial)
        save_state(folder, state)
        log(f"{folder.name} {trial['name']} ({len(done(state)) + 1}/{count}): {_params(params)}")
        _train_trial(trial, config, shared, folder, state["trials"], data, train)
        save_state(folder, state)
        failures = failures + 1 if trial["status"] == FAILED else 0
        log(f"{folder.name} {trial['name']}: {_outcome(trial, config)}")
    if failures >= MAX_FAILURES_IN_A_ROW:
        state["stopped_because"] = f"{failures} trials failed in a row"
    return state


def _train_trial(trial, config, shared, folder, trials, data, train) -> None:
    out = folder / "trials" / trial["name"]
    if trial["params"].get("lr", shared.get("lr")) == 0:
        trial.update(
            status=FAILED,
            error="lr 0 (quantised by q) cannot learn; not trained, recorded as failed",
        )
        return
    try:
        run_config = make_config(**{**shared, **trial["params"], "out": str(out)})
    except ConfigError as error:
        trial.update(status=FAILED, error=f"ConfigError: {error}")
        return
    cbs = [hyperband_callback(config, trials, trial)] if "early_terminate" in config else []
    name = f"{folder.name}-{trial['name']}"
    run_trial(trial, run_config, data, train, cbs=cbs, group=folder.name, name=name)


def _params(params: dict[str, Any]) -> str:
    return "  ".join(
        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()
    )


def _outcome(trial: dict[str, Any], config: dict[str, Any]) -> str:
    if trial["status"] == FAILED:
        return f"failed: {trial['error']}"
    metric = config["metric"]["name"]
    line = f"{trial['status']}, {metric} {trial[metric]:.4f} in {trial['wall_s']:.1f} s"
    return line + (
        f" (stopped after {len(trial['history'])} epochs)" if trial["status"] == STOPPED else ""
    )


def hyperband_callback(
    config: dict[str, Any], trials: list[dict[str, Any]], trial: dict[str, Any]
) -> Any:
    """A fastai callback asking `sweeps.stop_runs` after each epoch whether to stop this trial."""
    from fastai.callback.core import Callback, CancelFitException

    metric = config["metric"]["name"]

    class HyperbandStop(Callback):
        order = 100  # after the Recorder has the epoch's metrics

        def after_epoch(self) -> None:
            names = list(self.recorder.metric_names[1:-1])
            history = [dict(zip(names, values)) for values in self.recorder.values]
            current = {**trial, "history": history, metric: history[-1].get(metric)}
            others = [t for t in trials if t["status"] in (FINISHED, STOPPED)]
            fixed = fixed_values(config)
            runs = [as_sweep_run(t, fixed) for t in others]
            runs.append(as_sweep_run(current, fixed, running=True))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stop = sweeps.stop_runs(config, runs)
            if any(run.name == trial["name"] for run in stop):
                raise CancelFitException

    return HyperbandStop()


def cloud_sweep(sweep_path: str, count: int, flags: dict[str, Any]) -> str:
    """Create the sweep on W&B's server from the YAML as loaded; return its id."""
    import wandb

    config = load_sweep(sweep_path)
    run_flags(sweep_path, config, flags)
    _require_login()
    project = flags.get("project") or FLAGS["project"].default
    try:
        return wandb.sweep(config, project=project)
    except Exception as error:  # noqa: BLE001 - wandb raises many kinds for network trouble
        raise ConfigError(f"W&B could not create the sweep ({_first_line(error)})") from None


def cloud_agent(sweep_id: str, count: int | None, flags: dict[str, Any]) -> None:
    """Join W&B sweep `sweep_id`: train the runs its server proposes, in this process."""
    import wandb

    from .files import load_cifar100
    from .trials import fit_trial

    _require_login()
    data = load_cifar100(flags.get("data") or None)
    project = flags.get("project") or FLAGS["project"].default

    folder = sweep_folder(sweep_id, flags)

    def trial() -> None:
        out = folder / os.environ.get("WANDB_RUN_ID", "run")
        fit_trial(make_config(**{**flags, **sweep_params(), "out": str(out)}), data)

    try:
        wandb.agent(sweep_id, function=trial, count=count, project=project)
    except Exception as error:  # noqa: BLE001 - as in cloud_sweep
        raise ConfigError(f"W&B agent for sweep {sweep_id} failed ({_first_line(error)})") from None


def sweep_params() -> dict[str, Any]:
    """The values W&B's agent chose for the run it is starting (it writes them to a YAML file)."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not Path(path).is_file():
        raise ConfigError("no W&B sweep run is starting here (WANDB_SWEEP_PARAM_PATH unset)")
    content = yaml.safe_load(Path(path).read_text()) or {}
    return {k: v["value"] for k, v in content.items() if isinstance(v, dict) and "value" in v}


def _require_login() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # importing fastai warns about torch.jit; not ours to fix
        from .tracking import logged_in

    if not logged_in():
        raise ConfigError(
            "--controller wandb needs a W&B login (run `wandb login` or set WANDB_API_KEY) "
            "and network access; without them use --controller local"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()
