import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

from cifar100_fit.config import FLAGS


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bs", "0"], "--bs 0 is out of range; accepted: [1, ∞)"),
        (["--epochs", "-1"], "--epochs -1 is out of range"),
        (["--lr", "abc"], "--lr 'abc' is not a number"),
        (["--subset", "0"], "--subset 0 is out of range; accepted: (0, 1]"),
        (["--subset", "1.5"], "--subset 1.5 is out of range"),
        (["--optimizer", "sgd"], "unknown flag --optimizer for 'fit run'; accepted: --resume"),
        (["--arch", "vgg11"], "--arch 'vgg11' is not accepted; choose one of"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, message):
    result = run_cli("run", *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fit: error: {result.stderr.split(': ', 2)[2].strip()}"
    ]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_command_is_refused():
    result = run_cli("train")
    assert result.returncode == 2
    assert "unknown command 'train'; commands: run" in result.stderr


def test_missing_data_file_is_named(tmp_path, tiny_data):
    (tiny_data / "cifar-100-python" / "test").unlink()
    result = run_cli("run", "--data", str(tiny_data), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "cifar-100-python/test is missing" in result.stderr


def test_corrupt_data_file_is_named(tmp_path, tiny_data):
    train = tiny_data / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes()[:5000])
    result = run_cli("run", "--data", str(tiny_data), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert f"{train} is truncated or corrupt" in result.stderr


def test_help_and_bad_flags_do_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from cifar100_fit.cli import main\n"
        "for argv in (['run', '--help'], ['run', '--bs', '0']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()),"
        " contextlib.redirect_stderr(io.StringIO()):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch', 'fastai', 'timm', 'wandb') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PAGER": "cat"},
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_run_help_documents_every_flag_with_its_default():
    result = run_cli("run", "--help", env={"PAGER": "cat"})
    shown = result.stdout + result.stderr  # fire writes help to stderr when not on a terminal
    assert result.returncode == 0
    for name, spec in FLAGS.items():
        assert f"--{name}=" in shown
        assert spec.metadata["help"][:40] in shown.replace("\n        ", " ")
    assert "Default: 256" in shown and "Default: 0.015" in shown


@pytest.mark.slow
@pytest.mark.real_data
def test_run_trains_saves_and_refuses_to_overwrite(tmp_path, real_data):
    out = tmp_path / "run"
    args = [
        "run",
        "--epochs",
        "1",
        "--subset",
        "0.01",
        "--bs",
        "50",
        "--data",
        str(real_data),
        "--out",
        str(out),
        "--wandb",
        "offline",
    ]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("top-1 ") and "1 epochs" in last and f"saved in {out}" in last
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["accuracy"] <= 1 and len(summary["history"]) == 1
    assert (out / "model.pt").is_file()
    assert json.loads((out / "config.json").read_text())["subset"] == 0.01

    again = run_cli(*args)
    assert again.returncode == 0 and "already finished: top-1" in again.stdout

    other = run_cli(*args[:-4], "--out", str(out), "--lr", "0.02", "--wandb", "offline")
    assert other.returncode == 2
    assert "holds a run with another config (lr 0.015 -> 0.02)" in other.stderr
