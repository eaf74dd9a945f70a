"""Shared fixtures: a tiny CIFAR-100 written in the official layout, the real data, the CLI."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("CIFAR100_DATA") or ROOT.parent / "shared" / "data" / "cifar100")

# No test may wait on a W&B login or reach the network.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)


def write_cifar_pickles(
    root: Path, train_per_class: int = 4, test_per_class: int = 2, seed: int = 0
) -> Path:
    """Write train/test/meta pickles in the official CIFAR-100 layout under root/cifar-100-python.

    Each class's images have a distinct mean colour, so a network can learn them in a few steps.
    """
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), per_class)
        rng.shuffle(labels)
        base = (labels[:, None] * 37 % 200 + 20).astype(np.int64)
        noise = rng.integers(-20, 21, size=(len(labels), 3072))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        content = {
            "filenames": [f"{split}_{i}.png" for i in range(len(labels))],
            "batch_label": f"tiny {split}",
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": pixels,
        }
        with open(folder / split, "wb") as file:
            pickle.dump(content, file, protocol=2)
    meta = {
        "fine_label_names": [f"class_{i:02d}" for i in range(100)],
        "coarse_label_names": [f"super_{i:02d}" for i in range(20)],
    }
    with open(folder / "meta", "wb") as file:
        pickle.dump(meta, file, protocol=2)
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A folder holding a tiny CIFAR-100 (400 train, 200 test images) in the official layout."""
    return write_cifar_pickles(tmp_path / "data")


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real CIFAR-100 folder; tests using it skip when it is absent (a user's fresh clone)."""
    if not (REAL_DATA / "cifar-100-python" / "train").is_file():
        pytest.skip(f"real CIFAR-100 not found at {REAL_DATA}; set CIFAR100_DATA to run this test")
    return REAL_DATA


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m cifar100_fit ARGS` from the repository's copy of the package."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cifar100_fit", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
