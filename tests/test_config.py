import pytest

from cifar100_fit.config import ConfigError, make_config


def test_defaults_are_the_studys_best_run():
    config = make_config()
    assert (config.bs, config.epochs, config.lr, config.wd) == (256, 30, 0.015, 0.18)
    assert config.run_name == "resnet18_cifar-bs256-e30-lr0.015-wd0.18-s0"


def test_values_from_the_command_line_are_converted():
    config = make_config(bs="128", epochs=5.0, lr="1e-3", project=2024)
    assert (config.bs, config.epochs, config.lr, config.project) == (128, 5, 0.001, "2024")
    assert make_config(subset=0.01).run_name.endswith("-sub0.01")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"bs": 0}, r"--bs 0 is out of range; accepted: \[1, ∞\)"),
        ({"epochs": -1}, r"--epochs -1 is out of range"),
        ({"bs": 2.5}, r"--bs 2.5 is not a whole number"),
        ({"lr": "abc"}, r"--lr 'abc' is not a number"),
        ({"lr": 0}, r"--lr 0 is out of range; accepted: \(0, ∞\)"),
        ({"wd": float("nan")}, r"--wd nan is not a finite number"),
        ({"subset": 0}, r"--subset 0 is out of range; accepted: \(0, 1\]"),
        ({"subset": 1.5}, r"--subset 1.5 is out of range"),
        ({"label_smoothing": 1}, r"--label_smoothing 1 is out of range; accepted: \[0, 1\)"),
        ({"arch": "vgg"}, r"--arch 'vgg' is not accepted; choose one of: resnet18_cifar, resnet18"),
        ({"valid": "train"}, r"--valid 'train' is not accepted; choose one of: test, holdout"),
        ({"wandb": "maybe"}, r"choose one of: online, offline, disabled"),
        ({"momentum": 0.9}, r"unknown flag --momentum; accepted: --bs, --epochs"),
    ],
)
def test_bad_values_name_the_value_and_what_is_accepted(flags, message):
    with pytest.raises(ConfigError, match=message):
        make_config(**flags)


def test_default_run_folder_is_named_by_config_or_by_wandb_agent(monkeypatch):
    from pathlib import Path

    from cifar100_fit.runs import out_folder

    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert out_folder(make_config(lr=0.02)) == Path(
        "runs/resnet18_cifar-bs256-e30-lr0.02-wd0.18-s0"
    )
    assert out_folder(make_config(out="elsewhere")) == Path("elsewhere")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "run9")
    assert out_folder(make_config()) == Path("runs/sweeps/abc123/run9")
