"""Resume after SIGKILL or Ctrl-C, safe checkpoint loading, read-only --out, several processes."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

# ResNet18 with timm's ImageNet stem is ~16x cheaper than the 32px stem at 32x32: the bit-exact
# comparisons do not need the better model, only a real run. 100 train / 100 test images, 4 steps.
TINY = ("--arch", "resnet18", "--subset", "0.002", "--bs", "25", "--wandb", "offline")
EPOCHS = ("--epochs", "3")


def tiny_run(data: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--data", str(data), *TINY, *EPOCHS, "--out", str(out), *extra]


def start_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "cifar100_fit", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"run ended before {path} appeared: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def wandb_records(path: Path):
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = path.read_bytes(), 7, b""  # 7-byte file header
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        if kind == 0 or len(chunk) < length:  # zero padding, or cut short by SIGKILL
            return
        position, pending = position + 7 + length, pending + chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(out: Path) -> dict[str, list[Path]]:
    """The offline run files under `out`, grouped by W&B run id."""
    runs: dict[str, list[Path]] = {}
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        runs.setdefault(path.stem.removeprefix("run-"), []).append(path)
    return runs


def logged_epochs(paths: list[Path]) -> list[int]:
    """The epoch of every validation row logged into these run files."""
    epochs = []
    for path in paths:
        for record in wandb_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            if "accuracy" in items:
                epochs.append(items["epoch"])
    return epochs


def weights_equal(first: Path, second: Path) -> bool:
    import torch

    a, b = (torch.load(p, weights_only=True) for p in (first, second))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(real_data: Path, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run: what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli(*tiny_run(real_data, out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_sigkill_after_first_checkpoint_then_resume_equals_uninterrupted(
    real_data: Path, reference: Path, tmp_path: Path
):
    from cifar100_fit.checkpoint import load_checkpoint

    out = tmp_path / "run"
    process = start_cli(*tiny_run(real_data, out))
    wait_for(out / "checkpoint.pt", process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 0  # epoch 1 of 3 saved
    first_epoch = json.loads((reference / "summary.json").read_text())["history"][0]
    evaluation = run_cli("evaluate", str(out / "checkpoint.pt"))
    assert evaluation.stdout.startswith(f"top-1 {first_epoch['accuracy']:.2%}  "), evaluation

    result = run_cli(*tiny_run(real_data, out, "--resume"))

    assert result.returncode == 0, result.stderr
    assert "epochs 1-1 of 3 done, continuing with epoch 2" in result.stdout
    table_epochs = [line.split()[0] for line in result.stdout.splitlines() if "00:" in line]
    assert [e[-1] for e in table_epochs if e[-1].isdigit()] == ["1", "2"]  # 0-based rows
    resumed, uninterrupted = (
        json.loads((o / "summary.json").read_text()) for o in (out, reference)
    )
    assert resumed["history"] == uninterrupted["history"]  # bit-exact on the CPU
    assert weights_equal(out / "model.pt", reference / "model.pt")
    assert not (out / "checkpoint.pt").exists()
    runs = wandb_runs(out)
    assert len(runs) == 1, runs  # both sessions log into one W&B run id
    (files,) = runs.values()
    assert len(files) == 2
    assert sorted(logged_epochs(files)) == [1, 2, 3]  # W&B counts epochs from 1 after each


@pytest.mark.slow
def test_sigint_mid_epoch_exits_with_resume_command_and_resumes(
    real_data: Path, reference: Path, tmp_path: Path
):
    out = tmp_path / "run"
    process = start_cli(*tiny_run(real_data, out))
    wait_for(out / "checkpoint.pt", process)
    time.sleep(0.5)  # into epoch 2
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert f"saved in {out / 'checkpoint.pt'}" in stderr
    command = stderr.split("resume with: ")[1].strip().splitlines()[0]
    assert command.startswith("python -m cifar100_fit run ") and command.endswith(" --resume")
    (first_file,) = next(iter(wandb_runs(out).values()))
    kinds = {record.WhichOneof("record_type"): record for record in wandb_records(first_file)}
    assert "preempting" in kinds and kinds["exit"].exit.exit_code == 130

    resumed = run_cli(*shlex.split(command)[3:])

    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["history"] == json.loads((reference / "summary.json").read_text())["history"]
    assert sorted(logged_epochs(next(iter(wandb_runs(out).values())))) == [1, 2, 3]
    again = run_cli(*shlex.split(command)[3:])
    assert again.returncode == 0 and again.stdout.startswith("already finished: ")


def checkpoint_state(**config_overrides) -> dict:
    """A minimal well-formed checkpoint of the TINY config (no training needed)."""
    from cifar100_fit.checkpoint import FORMAT
    from cifar100_fit.config import make_config

    config = make_config(arch="resnet18", subset=0.002, bs=25, epochs=3, **config_overrides)
    empty: dict = {}
    return dict(
        format=FORMAT,
        config=config.to_dict(),
        epoch=0,
        n_epoch=3,
        model=empty,
        opt=empty,
        rng=[],
        history=empty,
        wandb=dict(id="x", step=3),
    )


def prepared_out(tmp_path: Path, state: dict | bytes) -> Path:
    """A run folder with the TINY config.json and `state` as its checkpoint."""
    import torch

    from cifar100_fit.config import make_config

    out = tmp_path / "run"
    out.mkdir()
    config = make_config(arch="resnet18", subset=0.002, bs=25, epochs=3, out=str(out))
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    if isinstance(state, bytes):
        (out / "checkpoint.pt").write_bytes(state)
    else:
        torch.save(state, out / "checkpoint.pt")
    return out


def test_checkpoint_of_another_config_is_refused_naming_the_key(real_data: Path, tmp_path: Path):
    out = prepared_out(tmp_path, checkpoint_state(lr=0.1))

    result = run_cli(*tiny_run(real_data, out))

    assert result.returncode == 2
    assert "checkpoint.pt belongs to a run with another config (lr 0.1 -> 0.015)" in result.stderr
    assert "Traceback" not in result.stderr


def test_changed_flag_on_a_run_folder_is_refused_before_training(real_data: Path, tmp_path: Path):
    out = prepared_out(tmp_path, checkpoint_state())

    result = run_cli(*tiny_run(real_data, out, "--wd", "0.5"))

    assert result.returncode == 2
    assert "holds a run with another config (wd 0.18 -> 0.5)" in result.stderr


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04 truncated zip"])
def test_corrupt_checkpoint_gives_a_clear_error(real_data: Path, tmp_path: Path, content: bytes):
    out = prepared_out(tmp_path, content)

    result = run_cli(*tiny_run(real_data, out, "--resume"))

    assert result.returncode == 2
    assert f"fit: error: {out / 'checkpoint.pt'} is corrupt" in result.stderr
    assert "Traceback" not in result.stderr


class RunsCode:
    """Unpickling this calls os.system: what a weights-only load must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_code_on_unpickling_is_refused(tmp_path: Path):
    import torch

    from cifar100_fit.checkpoint import load_checkpoint
    from cifar100_fit.runs import CheckpointError

    marker = tmp_path / "code-ran"
    torch.save({"model": RunsCode(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as file:  # a plain pickle, not torch's zip format
        pickle.dump(RunsCode(marker), file, protocol=2)

    for name in ("evil.pt", "evil.pkl"):
        with pytest.raises(CheckpointError, match=f"{name} refused: it holds Python objects"):
            load_checkpoint(tmp_path / name)
    result = run_cli("evaluate", str(tmp_path / "evil.pt"))

    assert result.returncode == 2 and "refused" in result.stderr
    assert not marker.exists()


def test_resume_without_a_checkpoint_is_refused(real_data: Path, tmp_path: Path):
    result = run_cli(*tiny_run(real_data, tmp_path / "empty", "--resume"))

    assert result.returncode == 2
    assert f"--resume: no checkpoint.pt in {tmp_path / 'empty'}" in result.stderr


def test_out_under_a_file_fails_before_training_naming_it(real_data: Path, tmp_path: Path):
    (tmp_path / "file").write_text("")

    result = run_cli(*tiny_run(real_data, tmp_path / "file" / "run"))

    assert result.returncode == 2
    assert f"--out {tmp_path / 'file' / 'run'} cannot be created" in result.stderr


def test_read_only_out_fails_before_training_naming_it(real_data: Path, tmp_path: Path):
    folder = tmp_path / "readonly"
    (folder / "run").mkdir(parents=True)
    command = shlex.join(
        [sys.executable, "-m", "cifar100_fit", *tiny_run(real_data, folder / "run")]
    )
    if os.geteuid() != 0:
        folder.chmod(0o555)
        (folder / "run").chmod(0o555)
        shell = command
    elif shutil.which("unshare"):
        # root writes through any mode bits: mount the folder read-only in a private namespace
        target = shlex.quote(str(folder))
        mount = f"mount --bind {target} {target} && mount -o remount,bind,ro {target} {target}"
        shell = f"unshare -rm sh -c {shlex.quote(f'{mount} && exec {command}')}"
    else:
        pytest.skip("running as root without unshare: no way to make a read-only folder")
    start = time.monotonic()
    result = subprocess.run(
        shell,
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if "unshare: " in result.stderr or "mount: " in result.stderr:
        pytest.skip(f"no user namespace here: {result.stderr.strip()}")

    assert result.returncode == 2, result.stderr
    assert f"--out {folder / 'run'} is not writable" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - start < 30  # refused before data loading or training
    assert list((folder / "run").iterdir()) == []


def test_bs_that_does_not_split_over_processes_is_refused(monkeypatch):
    from cifar100_fit.config import ConfigError, make_config
    from cifar100_fit.distributed import prepare_process

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="--bs 32 does not split evenly over 3 processes"):
        prepare_process(make_config(bs=32))


LAUNCHERS = {
    "torchrun": ["torchrun", "--nproc_per_node", "2", "-m", "cifar100_fit"],
    "accelerate": [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "-m",
        "cifar100_fit",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_on_the_cpu_train_one_run(launcher: str, real_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = [
        "run",
        "--data",
        str(real_data),
        *TINY,
        "--bs",
        "24",
        "--epochs",
        "2",
        "--out",
        str(out),
    ]
    bin_folder = Path(sys.executable).parent
    result = subprocess.run(
        [str(bin_folder / LAUNCHERS[launcher][0]), *LAUNCHERS[launcher][1:], *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "DistributedDataParallel over 2 processes (gloo): 12 images per process" in result.stdout
    summary_lines = [line for line in result.stdout.splitlines() if line.startswith("top-1 ")]
    assert len(summary_lines) == 1  # only rank 0 prints the summary
    assert len(wandb_runs(out)) == 1 and len(list(out.glob("*.pt"))) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["history"]) == 2
    evaluation = run_cli("evaluate", str(out / "model.pt"))
    assert evaluation.returncode == 0, evaluation.stderr
    assert evaluation.stdout.startswith(
        f"top-1 {summary['accuracy']:.2%}  top-5 {summary['top5_accuracy']:.2%}  on 100 test"
    )


def test_evaluate_flip_tta_averages_a_model_with_its_mirror(real_data: Path, tmp_path: Path):
    import torch

    from cifar100_fit.config import make_config
    from cifar100_fit.data import CIFAR100_MEAN, CIFAR100_STD, select_splits
    from cifar100_fit.evaluate import evaluate_file
    from cifar100_fit.files import load_cifar100
    from cifar100_fit.model import create_model

    torch.manual_seed(0)
    model = create_model("resnet18").eval()
    out = tmp_path / "run"
    out.mkdir()
    config = make_config(arch="resnet18", data=str(real_data), bs=50, subset=0.002)
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    torch.save(model.state_dict(), out / "model.pt")
    test = select_splits(load_cifar100(real_data), subset=0.002)[1]
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in (CIFAR100_MEAN, CIFAR100_STD))
    images = (torch.from_numpy(test.pixels).view(-1, 3, 32, 32).float() / 255 - mean) / std
    labels = torch.from_numpy(test.labels).long()
    with torch.no_grad():
        plain_scores = model(images)
        tta_scores = (plain_scores + model(images.flip(-1))) / 2

    plain, tta = (evaluate_file(out / "model.pt", tta=flag) for flag in (False, True))

    assert plain.images == tta.images == 100
    for result, scores in ((plain, plain_scores), (tta, tta_scores)):
        assert result.accuracy == pytest.approx(float((scores.argmax(-1) == labels).float().mean()))
    assert "with flip TTA" in tta.line and "with flip TTA" not in plain.line
    assert evaluate_file(out / "model.pt").tta is config.tta  # by default, as the run evaluated
