"""Sweeps, repeats and reports: the study's configs, the local controller, the W&B cloud path."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli

from cifar100_fit.config import ConfigError
from cifar100_fit.repeat import parse_epochs
from cifar100_fit.report import report
from cifar100_fit.sweep import load_sweep, local_sweep, propose, schema_problems
from cifar100_fit.trials import open_state

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
STUDY = {(128, 30), (256, 30), (256, 50), (256, 70), (512, 25), (512, 50), (1024, 50)}
# A trial of a few seconds on 2 CPU cores: 100 train and 50 valid images, the ImageNet stem.
FAST = ("--epochs", "1", "--bs", "50", "--subset", "0.25", "--arch", "resnet18")
FAST_FLAGS = {"epochs": 1, "bs": 50, "subset": 0.25, "arch": "resnet18"}


def write_yaml(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def study_config(**changes) -> dict:
    config = yaml.safe_load((ROOT / "configs" / "bs256-e30.yaml").read_text())
    config.update(changes)
    return config


# ---- the study's configs ------------------------------------------------------------------


def test_configs_are_the_seven_sweeps_of_the_study():
    found = {
        (c["parameters"]["bs"]["value"], c["parameters"]["epochs"]["value"])
        for c in map(lambda p: yaml.safe_load(p.read_text()), CONFIGS)
    }
    assert found == STUDY
    assert {p.name for p in CONFIGS} == {f"bs{b}-e{e}.yaml" for b, e in STUDY}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_passes_the_sweeps_schema_and_gives_the_stated_modes(path: Path):
    import sweeps

    config = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(config) == []
    filled = sweeps.SweepConfig(config)  # raises on any schema violation
    assert filled["method"] == "bayes"
    assert filled["metric"] == {
        "name": "accuracy",
        "goal": "maximize",
        "impute": "worst",
        "impute_while_running": "false",
    } or (filled["metric"]["name"], filled["metric"]["goal"]) == ("accuracy", "maximize")
    lr, wd = config["parameters"]["lr"], config["parameters"]["wd"]
    for spec, mode, q in ((lr, 0.02, 0.005), (wd, 0.1, 0.01)):
        assert spec["distribution"] == "q_log_normal"
        assert spec["sigma"] == 1.0 and spec["q"] == q
        assert math.exp(spec["mu"] - spec["sigma"] ** 2) == pytest.approx(mode, rel=1e-6)
    assert config["command"] == ["${env}", "fit", "run", "${args}"]
    assert "mu = ln(0.02) + 1" in path.read_text()  # the arithmetic is written down
    assert load_sweep(path) == config  # and our own loader accepts it unchanged


# ---- bad sweep files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method": "annealing"}, r"'annealing' is not one of \['bayes', 'random', 'grid'"),
        (
            {"parameters": {"lr": {"distribution": "uniform", "min": 0.01}}},
            r"parameter lr \(uniform\): it: 'max' is a required property",
        ),
        (
            {"parameters": {"lr": {"distribution": "q_log_normal", "mu": -3, "sigma": -1.0}}},
            r"parameter lr \(q_log_normal\): sigma: -1.0 is less than the minimum of 0",
        ),
        (
            {"parameters": {"lr": {"distribution": "gaussian"}}},
            r"distribution 'gaussian' is not accepted \(one of: .*log_uniform_values",
        ),
        (
            {"parameters": {"momentum": {"values": [0.9, 0.95]}}},
            r"parameter momentum is not a `fit run` flag; accepted: bs, epochs, lr",
        ),
        (
            {"metric": {"name": "loss", "goal": "minimize"}},
            r"metric 'loss' is not a summary key of `fit run`; accepted: accuracy",
        ),
    ],
)
def test_invalid_sweep_yaml_is_refused_by_name(tmp_path: Path, changes: dict, message: str):
    path = write_yaml(tmp_path / "bad.yaml", study_config(**changes))
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_yaml_that_does_not_parse_is_refused(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("method: bayes\nparameters: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML"):
        load_sweep(path)
    assert schema_problems({"method": "bayes"}) == [
        "`parameters` is required unless `scheduler.search_space` is set."
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["sweep", "configs/missing.yaml"], r"sweep config configs/missing.yaml not found"),
        (
            ["sweep", "configs/bs256-e30.yaml", "--count", "0"],
            r"--count 0 is not accepted; pass a whole number >= 1",
        ),
        (
            ["sweep", "configs/bs256-e30.yaml", "--controller", "cloud"],
            r"--controller 'cloud' is not accepted; choose one of: local, wandb",
        ),
        (["sweep", "configs/bs256-e30.yaml", "--lr", "0.1"], r"--lr is searched by"),
        (["sweep", "configs/bs256-e30.yaml", "--subset", "2"], r"--subset 2 is out of range"),
        (["repeat", "--times", "0"], r"--times 0 is not accepted; pass a whole number >= 1"),
        (["repeat", "--epochs", "30,x"], r"--epochs \(30, 'x'\) is not a list of epoch counts"),
        (["repeat", "--epochs", "30,0"], r"is not a list of epoch counts; pass whole numbers"),
        (["repeat", "--seed", "3"], r"fit repeat trains seeds 0..N-1 .*; drop --seed"),
        (["report", "configs"], r"configs holds no sweep.json or repeat.json"),
        (["report", "configs", "--top", "0"], r"--top 0 is not accepted"),
        (
            ["agent", "abc", "--count", "-1"],
            r"--count -1 is not accepted; pass a whole number >= 0",
        ),
    ],
)
def test_bad_command_line_gives_one_line_and_exit_2(args: list[str], message: str):
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fit: error: "), result.stderr
    assert __import__("re").search(message, lines[0]), lines[0]


def test_invalid_yaml_on_the_command_line(tmp_path: Path):
    path = write_yaml(tmp_path / "bad.yaml", study_config(method="annealing"))
    result = run_cli("sweep", str(path), "--count", "2")
    assert result.returncode == 2
    assert result.stderr.startswith(f"fit: error: {path} is not a valid W&B sweep: 'annealing'")


@pytest.mark.parametrize("given, parsed", [((30, 50), [30, 50]), (30, [30]), ("30, 50", [30, 50])])
def test_epochs_list_as_fire_hands_it_over(given, parsed):
    assert parse_epochs(given) == parsed


# ---- proposals ----------------------------------------------------------------------------


def test_proposals_lie_on_the_quantisation_grid_and_repeat_for_the_same_history():
    config = load_sweep(ROOT / "configs" / "bs256-e30.yaml")
    trials = []
    for index in range(6):
        params = propose(config, trials, index)
        assert set(params) == {"lr", "wd"}  # fixed values come from the shared flags
        for name, q in (("lr", 0.005), ("wd", 0.01)):
            assert params[name] == round(params[name], 6)
            assert params[name] / q == pytest.approx(round(params[name] / q), abs=1e-9)
        assert propose(config, trials, index) == params
        accuracy = 0.3 - abs(math.log(max(params["lr"], 1e-3) / 0.02)) / 10
        history = [{"accuracy": accuracy}]
        trials.append(
            {
                "name": f"t{index}",
                "params": params,
                "status": "finished",
                "accuracy": accuracy,
                "history": history,
            }
        )


def test_lr_zero_is_recorded_as_failed_without_training(tmp_path: Path, tiny_data: Path):
    # a YAML whose prior puts every lr draw under q/2, so every proposal is lr 0
    config = study_config()
    config["parameters"]["lr"] = {
        "distribution": "q_log_normal",
        "mu": -12,
        "sigma": 0.1,
        "q": 0.005,
    }
    path = write_yaml(tmp_path / "zero.yaml", config)
    called = []
    state = local_sweep(
        str(path),
        1,
        {**FAST_FLAGS, "data": str(tiny_data), "out": str(tmp_path / "sweep")},
        train=lambda *a, **k: called.append(a),
        log=lambda line: None,
    )
    assert called == []
    assert [t["params"]["lr"] for t in state["trials"]] == [0, 0, 0]
    assert {t["status"] for t in state["trials"]} == {"failed"}
    assert "lr 0 (quantised by q) cannot learn" in state["trials"][0]["error"]
    assert state["stopped_because"] == "3 trials failed in a row"


# ---- the sweep folder -----------------------------------------------------------------------


def test_a_folder_holding_another_sweep_is_refused_and_left_alone(tmp_path: Path):
    folder = tmp_path / "bs256-e30"
    open_state(
        folder,
        "sweep",
        {"name": folder.name, "sweep_config": study_config(), "flags": {"epochs": 2}},
    )
    before = (folder / "sweep.json").read_bytes()
    with pytest.raises(ConfigError, match=r"holds a sweep with another setup \(flags: "):
        local_sweep(str(ROOT / "configs" / "bs256-e30.yaml"), 1, {"epochs": 1, "out": str(folder)})
    with pytest.raises(ConfigError, match=r"holds a sweep, not a repeat; pass another --out"):
        open_state(folder, "repeat", {"name": folder.name, "flags": {}})
    assert (folder / "sweep.json").read_bytes() == before
    run_folder = tmp_path / "a-run"
    run_folder.mkdir()
    (run_folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"a-run holds a `fit run` run, not a sweep"):
        open_state(run_folder, "sweep", {"name": "a-run"})
    assert sorted(p.name for p in run_folder.iterdir()) == ["config.json"]


@pytest.mark.slow
def test_a_crashing_trial_is_recorded_and_the_sweep_goes_on(tmp_path: Path, tiny_data: Path):
    from cifar100_fit.trials import fit_trial

    calls = []

    def crash_first(config, data, **kwargs):
        calls.append(config.out)
        if len(calls) == 1:
            raise RuntimeError("out of memory in trial one")
        return fit_trial(config, data, **kwargs)

    flags = {**FAST_FLAGS, "data": str(tiny_data), "out": str(tmp_path / "sweep")}
    state = local_sweep(
        str(ROOT / "configs" / "bs512-e25.yaml"), 1, flags, train=crash_first, log=lambda line: None
    )
    first, second = state["trials"]
    assert first["status"] == "failed"
    assert first["error"] == "RuntimeError: out of memory in trial one"
    assert second["status"] == "finished" and 0 <= second["accuracy"] <= 1
    assert len(second["history"]) == 1 and Path(second["out"], "model.pt").is_file()
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["trials"] == state["trials"]
    assert saved["flags"] == {"arch": "resnet18", "bs": 50, "epochs": 1, "subset": 0.25}


@pytest.mark.slow
def test_sweep_killed_after_trial_one_resumes_to_three_trials(tmp_path: Path, tiny_data: Path):
    folder = tmp_path / "sweep"
    args = [
        "sweep",
        "configs/bs256-e30.yaml",
        "--count",
        "3",
        *FAST,
        "--data",
        str(tiny_data),
        "--out",
        str(folder),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "cifar100_fit", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        first = wait_for_first_trial(folder / "sweep.json", process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed = json.loads((folder / "sweep.json").read_text())  # a whole file, whatever the moment
    assert killed["trials"][0] == first

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    state = json.loads((folder / "sweep.json").read_text())
    finished = [t for t in state["trials"] if t["status"] == "finished"]
    assert len(finished) == 3
    assert state["trials"][0] == first  # trial 1 kept as it was, not trained again
    assert {t["status"] for t in state["trials"][3:]} <= {"interrupted"} | {"finished"}
    for trial in finished:
        assert trial["params"]["lr"] / 0.005 == pytest.approx(round(trial["params"]["lr"] / 0.005))
        assert trial["params"]["wd"] / 0.01 == pytest.approx(round(trial["params"]["wd"] / 0.01))
        assert Path(trial["out"]).parent == folder / "trials"
    assert len({t["out"] for t in state["trials"] if "out" in t}) == len(finished)
    assert (folder / "lr_wd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| trial-00" in (folder / "report.md").read_text()
    assert "# Sweep sweep" in result.stdout

    again = run_cli(*args)  # a finished sweep is not trained again
    assert "already holds 3 finished trials" in again.stdout
    assert json.loads((folder / "sweep.json").read_text())["trials"] == state["trials"]


def wait_for_first_trial(path: Path, process: subprocess.Popen, limit: float = 300) -> dict:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.is_file():
            trials = json.loads(path.read_text())["trials"]
            if trials and trials[0]["status"] != "running":
                return trials[0]
        assert process.poll() is None, "the sweep ended before its first trial was recorded"
        time.sleep(0.2)
    raise AssertionError(f"no finished trial in {path} after {limit} s")


# ---- repeat and report ----------------------------------------------------------------------


@pytest.mark.slow
def test_repeat_two_settings_two_seeds_writes_table_and_box_plot(tmp_path, tiny_data):
    folder = tmp_path / "repeat"
    result = run_cli(
        "repeat",
        "--epochs",
        "1,2",
        "--times",
        "2",
        "--bs",
        "50",
        "--subset",
        "0.25",
        "--arch",
        "resnet18",
        "--data",
        str(tiny_data),
        "--out",
        str(folder),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    state = json.loads((folder / "repeat.json").read_text())
    pairs = sorted((t["epochs"], t["seed"], t["status"]) for t in state["trials"])
    assert pairs == [(1, 0, "finished"), (1, 1, "finished"), (2, 0, "finished"), (2, 1, "finished")]
    assert [len(t["history"]) for t in state["trials"]] == [1, 1, 2, 2]
    markdown = (folder / "report.md").read_text()
    assert "| setting  | runs | mean" in markdown
    rows = [
        line
        for line in markdown.splitlines()
        if line.startswith("| 1 epochs") or line.startswith("| 2 epochs")
    ]
    assert len(rows) == 2 and all("| 2    |" in row for row in rows)
    accuracies = [t["accuracy"] for t in state["trials"] if t["epochs"] == 1]
    assert f"{sum(accuracies) / 2:.4f}" in rows[0]
    assert (folder / "box.png").read_bytes()[:4] == b"\x89PNG"
    assert markdown in result.stdout


def test_report_of_a_sweep_folder(tmp_path: Path):
    folder = tmp_path / "bs256-e30"
    state = open_state(
        folder,
        "sweep",
        {"name": folder.name, "sweep_config": study_config(), "flags": {"epochs": 1}},
    )
    for index, (lr, wd, accuracy) in enumerate(
        [(0.01, 0.1, 0.2), (0.05, 0.0, 0.4), (0.02, 0.3, 0.3)]
    ):
        state["trials"].append(
            {
                "name": f"trial-{index:03d}",
                "params": {"lr": lr, "wd": wd},
                "status": "finished",
                "accuracy": accuracy,
                "best_accuracy": accuracy,
                "history": [{}],
                "wall_s": 1.0,
            }
        )
    state["trials"].append(
        {
            "name": "trial-003",
            "params": {"lr": 0},
            "status": "failed",
            "error": "lr 0 (quantised by q) cannot learn",
        }
    )
    (folder / "sweep.json").write_text(json.dumps(state))
    result = run_cli("report", str(folder), "--top", "2")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| trial-")]
    assert [row.split("|")[1].strip() for row in rows] == ["trial-001", "trial-002"]
    assert "trials: 3 finished, 1 failed" in result.stdout
    assert "- trial-003 lr=0: lr 0 (quantised by q) cannot learn" in result.stdout
    assert (folder / "report.md").read_text() == report(folder, 2)
    assert (folder / "lr_wd.png").read_bytes()[:4] == b"\x89PNG"


# ---- the W&B cloud path -------------------------------------------------------------------


def test_cloud_sweep_sends_the_yaml_as_loaded(monkeypatch, tmp_path: Path, tiny_data: Path):
    import wandb

    from cifar100_fit import sweep, tracking

    sent, joined = {}, {}
    monkeypatch.setattr(tracking, "logged_in", lambda: True)
    monkeypatch.setattr(
        wandb,
        "sweep",
        lambda config, project: sent.update(config=config, project=project) or "abc123",
    )

    def agent(sweep_id, function, count, project):
        joined.update(sweep_id=sweep_id, count=count, project=project)
        # what W&B's agent does before calling the function: the chosen values in a YAML file
        params = tmp_path / "config-run1.yaml"
        params.write_text("wandb_version: 1\n\nlr:\n  value: 0.03\nwd:\n  value: 0.2\n")
        monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(params))
        monkeypatch.setenv("WANDB_RUN_ID", "run1")
        function()

    monkeypatch.setattr(wandb, "agent", agent)
    path = ROOT / "configs" / "bs128-e30.yaml"
    flags = {
        **FAST_FLAGS,
        "data": str(tiny_data),
        "out": str(tmp_path / "cloud"),
        "project": "study",
    }
    sweep_id = sweep.cloud_sweep(str(path), 1, flags)
    assert sent == {"config": yaml.safe_load(path.read_text()), "project": "study"}
    sweep.cloud_agent(sweep_id, 1, flags)
    assert joined == {"sweep_id": "abc123", "count": 1, "project": "study"}
    saved = json.loads((tmp_path / "cloud" / "run1" / "config.json").read_text())
    assert (saved["lr"], saved["wd"], saved["bs"], saved["epochs"]) == (0.03, 0.2, 50, 1)


@pytest.mark.parametrize(
    "args", [["sweep", "configs/bs256-e30.yaml", "--controller", "wandb"], ["agent", "abc123"]]
)
def test_cloud_path_without_a_login_says_so_in_one_line(tmp_path: Path, args: list[str]):
    result = run_cli(*args, env={"HOME": str(tmp_path), "NETRC": str(tmp_path / "none")})
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "fit: error: --controller wandb needs a W&B login (run `wandb login` or set "
        "WANDB_API_KEY) and network access; without them use --controller local"
    )


@pytest.mark.slow
def test_hyperband_stops_a_trial_behind_the_finished_ones(tmp_path: Path, tiny_data: Path):
    from cifar100_fit.sweep import fixed_values
    from cifar100_fit.trials import identity_flags, save_state

    config = study_config(early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2})
    path = write_yaml(tmp_path / "hyperband.yaml", config)
    flags = {**FAST_FLAGS, "epochs": 3, "data": str(tiny_data)}
    folder = tmp_path / "sweep"
    identity = {"sweep_config": config, "flags": identity_flags({**fixed_values(config), **flags})}
    state = open_state(folder, "sweep", {"name": folder.name, **identity})
    # three finished trials far ahead at every epoch: a new trial on tiny data falls behind
    history = [{"accuracy": 0.5}, {"accuracy": 0.6}, {"accuracy": 0.7}]
    state["trials"] = [
        {
            "name": f"trial-00{i}",
            "params": {"lr": 0.02 + i / 100, "wd": 0.1},
            "status": "finished",
            "accuracy": 0.7,
            "history": history,
        }
        for i in range(3)
    ]
    save_state(folder, state)
    state = local_sweep(str(path), 4, {**flags, "out": str(folder)}, log=lambda line: None)
    new = state["trials"][3]
    assert new["status"] == "stopped" and len(new["history"]) == 1, new
    assert json.loads(Path(new["out"], "summary.json").read_text())["accuracy"] == new["accuracy"]


@pytest.mark.slow
def test_cloud_sweep_without_network_says_so_in_one_line(tmp_path: Path):
    # a key that looks real, and a server address where nothing listens
    env = {
        "WANDB_API_KEY": "0" * 40,
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_MODE": "online",
        "HOME": str(tmp_path),
    }
    result = run_cli(
        "sweep", "configs/bs256-e30.yaml", "--controller", "wandb", env=env, timeout=300
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("fit: error:")]
    assert len(errors) == 1 and "W&B could not create the sweep (" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
