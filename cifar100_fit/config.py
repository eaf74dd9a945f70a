"""The run configuration: one typed, validated object whose keys are CLI flags and W&B config keys.

This module imports nothing heavy, so the CLI can check its arguments in milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("resnet18_cifar", "resnet18")
VALID_SPLITS = ("test", "holdout")
WANDB_MODES = ("online", "offline", "disabled")
AUGMENTS = ("crop_flip", "none")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MIXES = ("none", "mixup", "cutmix")


class ConfigError(ValueError):
    """A value a user gave that cannot be used; the message names it and what is accepted."""


def _flag(default: Any, help: str, **check: Any) -> Any:
    return field(default=default, metadata={"help": help, **check})


@dataclass
class RunConfig:
    """Everything that defines a training run; saved with the run and sent to W&B."""

    bs: int = _flag(
        256, "batch size of one optimizer step, over all processes (N processes: bs/N each)", low=1
    )
    epochs: int = _flag(30, "number of epochs of the one-cycle schedule", low=1)
    lr: float = _flag(0.015, "peak learning rate of the one-cycle schedule", low=0, open_low=True)
    wd: float = _flag(0.18, "decoupled weight decay (AdamW): each step p <- p - lr*wd*p", low=0)
    seed: int = _flag(0, "random seed; the same seed on the CPU gives the same metrics", low=0)
    label_smoothing: float = _flag(
        0.1, "label smoothing of the cross-entropy", low=0, high=1, open_high=True
    )
    aug: str = _flag(
        "crop_flip",
        "training augmentation: crop_flip (pad 4, random crop, "
        "horizontal flip) or none (the study's setting)",
        choices=AUGMENTS,
    )
    arch: str = _flag(
        "resnet18_cifar",
        "resnet18_cifar (3x3 stride-1 stem, no max-pool) or "
        "resnet18 (timm's ImageNet stem, the study's baseline)",
        choices=ARCHS,
    )
    subset: float = _flag(
        1.0,
        "fixed stratified fraction of both splits, 0 < subset <= 1 "
        "(0.01 = 500 train, 100 valid images)",
        low=0,
        open_low=True,
        high=1,
    )
    valid: str = _flag(
        "test",
        "validation split: test (the 10,000 test images) or holdout "
        "(5,000 images held out of train)",
        choices=VALID_SPLITS,
    )
    precision: str = _flag(
        "auto",
        "auto (bf16 autocast on CUDA, fp32 on the CPU), bf16, fp16 or fp32",
        choices=PRECISIONS,
    )
    mix: str = _flag(
        "none",
        "batch mixing: none, mixup or cutmix (fastai's callbacks); off by default, since in a "
        "30-epoch schedule the network is still underfitting and mixing rarely pays",
        choices=MIXES,
    )
    mix_alpha: float = _flag(
        1.0, "alpha of the Beta(alpha, alpha) mixing ratio of --mix", low=0, open_low=True
    )
    tta: bool = _flag(
        True, "evaluate on the mean logits of each image and its mirror (flip test-time aug.)"
    )
    ema: float = _flag(
        0.0,
        "decay per step of an average of the weights used for evaluation and saved; 0 = off",
        low=0,
        high=1,
        open_high=True,
    )
    compile: bool = _flag(
        False, "torch.compile the model; compile time is reported apart from training time"
    )
    data: str = _flag(
        "", "folder holding cifar-100-python/ (default: $CIFAR100_DATA, else ~/.cache/cifar100_fit)"
    )
    out: str = _flag(
        "",
        "folder for the run's weights, config and W&B files (default: "
        "runs/<arch>-bs<bs>-e<epochs>-lr<lr>-wd<wd>-s<seed>)",
    )
    wandb: str = _flag(
        "",
        "W&B mode: online, offline or disabled (default: online when logged in, offline otherwise)",
        choices=("",) + WANDB_MODES,
    )
    project: str = _flag("cifar100_fit", "W&B project name")

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            setattr(self, spec.name, _checked(spec, getattr(self, spec.name)))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values, ready for JSON and `wandb.init(config=...)`."""
        return dataclasses.asdict(self)

    @property
    def run_name(self) -> str:
        """A name that tells runs apart by the values people sweep."""
        name = f"{self.arch}-bs{self.bs}-e{self.epochs}-lr{self.lr:g}-wd{self.wd:g}-s{self.seed}"
        return name if self.subset == 1 else f"{name}-sub{self.subset:g}"


FLAGS: dict[str, dataclasses.Field] = {spec.name: spec for spec in dataclasses.fields(RunConfig)}


def _checked(spec: dataclasses.Field, value: Any) -> Any:
    """Convert `value` to the flag's type and check its range, or raise `ConfigError`."""
    name, kind, meta = spec.name, spec.type, spec.metadata
    given, value = value, _converted(name, kind, value)
    if "choices" in meta and value not in meta["choices"]:
        accepted = ", ".join(c for c in meta["choices"] if c)
        raise ConfigError(f"--{name} {value!r} is not accepted; choose one of: {accepted}")
    if "low" in meta or "high" in meta:
        _check_range(name, value, given, meta)
    return value


def _converted(name: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        return _boolean(name, value)
    if kind == "int":
        # fire hands over 2.0 for "2.0" and True for a bare flag: accept only whole numbers
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"--{name} {value!r} is not a whole number")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"--{name} {value!r} is not a whole number") from None
        if not number.is_integer():
            raise ConfigError(f"--{name} {value!r} is not a whole number")
        return int(number)
    if kind == "float":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} {value!r} is not a number") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise ConfigError(f"--{name} {value!r} is not a finite number")
        return number
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # fire reads --project 2024 as a number
    if not isinstance(value, str):
        raise ConfigError(f"--{name} {value!r} is not text")
    return value


def _boolean(name: str, value: Any) -> bool:
    # fire gives True for a bare --flag and False for --noflag; YAML and JSON may give text
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    raise ConfigError(
        f"--{name} {value!r} is not accepted; give true or false (--{name}/--no{name})"
    )


def _check_range(name: str, value: float, given: Any, meta: dict) -> None:
    low, high = meta.get("low", -math.inf), meta.get("high", math.inf)
    too_low = value <= low if meta.get("open_low") else value < low
    too_high = value >= high if meta.get("open_high") else value > high
    if too_low or too_high:
        left = "(" if meta.get("open_low") else "["
        right = ")" if meta.get("open_high") or high == math.inf else "]"
        accepted = f"{left}{low:g}, {high:g}{right}".replace("inf", "∞")
        raise ConfigError(f"--{name} {given!r} is out of range; accepted: {accepted}")


def make_config(**values: Any) -> RunConfig:
    """Build a `RunConfig`, refusing unknown keys by name."""
    unknown = sorted(set(values) - set(FLAGS))
    if unknown:
        names = ", ".join(f"--{k}" for k in unknown)
        raise ConfigError(f"unknown flag {names}; accepted: {', '.join('--' + k for k in FLAGS)}")
    return RunConfig(**values)
