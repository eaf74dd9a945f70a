"""The fast path's CPU-testable pieces: batch augmentation, lean callbacks, AdamW, recipe flags."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_cli
from fastai.callback.core import Callback, event
from fastai.learner import Learner
from torch import nn

from cifar100_fit.config import ConfigError, make_config
from cifar100_fit.data import CIFAR100_MEAN, CIFAR100_STD, ByteNormalize, crop_flip
from cifar100_fit.files import Cifar100, RawSplit
from cifar100_fit.speed import FlipTTA, QuietProgress, WeightEMA
from cifar100_fit.train import ADAM_BETAS, ADAM_EPS, PlainTensors, cifar100_learner


def synthetic(train: int = 200, valid: int = 100, seed: int = 0) -> Cifar100:
    """Random uint8 CIFAR-shaped images in memory, labels cycling through the 100 classes."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> RawSplit:
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        return RawSplit(pixels, np.arange(n, dtype=np.int64) % 100)

    return Cifar100(split(train), split(valid), [f"c{i}" for i in range(100)])


def small_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 100))


def quiet_learner(**flags) -> Learner:
    flags.setdefault("wandb", "disabled")
    learn = cifar100_learner(data=synthetic(), **flags)
    learn.model = small_model()
    return learn


def test_crop_flip_equals_per_image_definition():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=generator)
    top, left = torch.randint(0, 9, (2, 16), generator=generator)
    flip = torch.rand(16, generator=generator) < 0.5
    batch = crop_flip(images, top, left, flip)
    for i in range(16):
        padded = F.pad(images[i], (4, 4, 4, 4))
        expected = padded[:, top[i] : top[i] + 32, left[i] : left[i] + 32]
        expected = expected.flip(-1) if flip[i] else expected
        assert torch.equal(batch[i], expected), f"image {i}"


def test_byte_normalize_equals_per_image_definition_and_decodes():
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in (CIFAR100_MEAN, CIFAR100_STD))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    normalize = ByteNormalize(mean, std)
    from fastai.torch_core import TensorImage

    out = normalize(TensorImage(images))
    for i in range(4):
        expected = (images[i].float() / 255 - mean[0]) / std[0]
        torch.testing.assert_close(out[i].as_subclass(torch.Tensor), expected)
    assert torch.equal(normalize.decode(out).as_subclass(torch.Tensor), images)


class StepRecorder(Callback):
    """Records each training batch, the hyper-parameters it used and the weights after its step."""

    order = 100

    def before_fit(self):
        self.start = copy.deepcopy(self.model.state_dict())
        self.steps = []

    def before_step(self):
        hypers = self.opt.hypers[0]
        self.steps.append(dict(xb=self.xb[0].clone(), yb=self.yb[0].clone(), **hypers))

    def after_step(self):
        self.steps[-1]["after"] = copy.deepcopy(self.model.state_dict())


def test_learner_adamw_matches_torch_adamw_step_for_step():
    learn = quiet_learner(bs=50, lr=0.01, wd=0.2, label_smoothing=0.1, tta=False)
    recorder = StepRecorder()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(2, 0.01, wd=0.2, cbs=recorder)
    steps = recorder.steps
    assert len(steps) == 8  # 200 images, bs 50, 2 epochs
    # fastai's one-cycle: lr starts at lr_max / 25, peaks at 30% of training, ends near zero
    assert steps[0]["lr"] == pytest.approx(0.01 / 25)
    assert max(s["lr"] for s in steps) > 0.009 and steps[-1]["lr"] < 0.01 / 10
    assert all(s["wd"] == 0.2 for s in steps)

    reference = small_model()
    reference.load_state_dict(recorder.start)
    optimizer = torch.optim.AdamW(
        reference.parameters(), lr=0.01, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.2
    )
    for i, step in enumerate(steps):
        group = optimizer.param_groups[0]
        group["lr"], group["betas"] = step["lr"], (step["mom"], step["sqr_mom"])
        loss = F.cross_entropy(reference(step["xb"]), step["yb"], label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(value, step["after"][name], msg=f"step {i}: {name}")


class EventLog(Callback):
    """Logs every event it receives, with run_valid on and off by event like fastai's own."""

    order = 50

    def __init__(self):
        self.events = []


def _logger(name: str):
    return lambda self: self.events.append(name)


for _name in (n for n in dir(event) if not n.startswith("_") and n != "after_create"):
    setattr(EventLog, _name, _logger(_name))


def test_quick_events_call_callbacks_as_fastai_does():
    learn = quiet_learner(bs=50)
    fastai_learn = Learner(learn.dls, small_model(), loss_func=learn.loss_func, cbs=PlainTensors())
    logs = []
    for learner in (learn, fastai_learn):
        log = EventLog()
        with learner.no_bar(), learner.no_logging():
            learner.fit(1, cbs=log)
        logs.append(log.events)
    assert logs[0] == logs[1]
    assert logs[0].count("before_step") == 4


class TrainOnlyLog(Callback):
    """Counts inner-loop events it is given while run_valid is False; switches off after 2 steps."""

    run_valid = False

    def before_fit(self) -> None:
        self.events = []

    def after_batch(self) -> None:
        self.events.append(("after_batch", self.training))
        if len(self.events) == 2:
            self.run = False  # fastai then skips this callback until the fit ends


class Boom(Callback):
    def before_batch(self) -> None:
        raise ValueError("broken callback")


def test_quick_events_honour_run_valid_run_and_wrap_errors_as_fastai_does():
    learn = quiet_learner(bs=50)
    fastai_learn = Learner(learn.dls, small_model(), loss_func=learn.loss_func, cbs=PlainTensors())
    logs = []
    for learner in (learn, fastai_learn):
        log = TrainOnlyLog()
        with learner.no_bar(), learner.no_logging():
            learner.fit(1, cbs=log)
        logs.append(log.events)
        assert log.run  # re-enabled at the end of the fit
    assert logs[0] == logs[1] == [("after_batch", True)] * 2
    failing = pytest.raises(ValueError, match="in `Boom` when calling event `before_batch`")
    with failing, learn.no_bar(), learn.no_logging():
        learn.fit(1, cbs=Boom())


def test_quiet_progress_replaces_fastai_bar_also_after_no_bar():
    learn = quiet_learner(bs=50)
    assert isinstance(learn.progress, QuietProgress)
    with learn.no_bar():
        assert not hasattr(learn, "progress")
    assert isinstance(learn.progress, QuietProgress)
    assert sum(isinstance(cb, QuietProgress) for cb in learn.cbs) == 1


def test_tta_evaluates_on_mean_logits_of_image_and_mirror():
    learn = quiet_learner(bs=50, tta=True)
    assert any(isinstance(cb, FlipTTA) for cb in learn.cbs)
    loss, top1, _ = learn.validate()
    x, y = learn.dls.valid.one_batch()
    x, y = x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)
    learn.model.eval()
    with torch.no_grad():
        plain = learn.model(x)
        averaged = (plain + learn.model(x.flip(-1))) / 2
    expected = F.cross_entropy(averaged, y, label_smoothing=0.1).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert (averaged.argmax(-1) == y).float().mean().item() == pytest.approx(top1)
    assert F.cross_entropy(plain, y, label_smoothing=0.1).item() != pytest.approx(expected)

    learn.remove_cb(FlipTTA)
    assert learn.validate()[0] == pytest.approx(
        F.cross_entropy(plain, y, label_smoothing=0.1).item(), rel=1e-5
    )


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mix_runs_a_short_epoch_and_restores_the_loss(mix):
    learn = quiet_learner(bs=50, mix=mix, mix_alpha=1.0)
    original = learn.loss_func

    class SeesMixedLoss(Callback):
        order = 100

        def after_loss(self):
            if self.training:
                self.swapped = self.learn.loss_func is not original

    seen = SeesMixedLoss()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 0.01, cbs=seen)
    assert seen.swapped
    assert learn.loss_func is original
    losses = [float(v) for v in learn.recorder.losses]
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_ema_weights_follow_their_definition():
    learn = quiet_learner(bs=50, ema=0.5, tta=False)

    class Weights(Callback):
        order = 60  # before WeightEMA (70) swaps anything

        def before_fit(self):
            self.history = [[p.detach().clone() for p in self.model.parameters()]]

        def after_step(self):
            self.history.append([p.detach().clone() for p in self.model.parameters()])

    weights = Weights()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 0.01, cbs=weights)
    expected = weights.history[0]
    for step in weights.history[1:]:
        expected = [0.5 * e + 0.5 * w for e, w in zip(expected, step)]
    for got, want in zip(learn.model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want)
    assert any(isinstance(cb, WeightEMA) for cb in learn.cbs)


def test_recipe_flags_are_validated():
    config = make_config(tta="false", compile=True, mix="cutmix", ema=0.99)
    assert (config.tta, config.compile, config.mix, config.ema) == (False, True, "cutmix", 0.99)
    with pytest.raises(ConfigError, match=r"--mix 'blend' is not accepted; choose one of: none"):
        make_config(mix="blend")
    with pytest.raises(ConfigError, match=r"--ema 1 is out of range; accepted: \[0, 1\)"):
        make_config(ema=1)
    with pytest.raises(ConfigError, match=r"--tta 'maybe' is not accepted; give true or false"):
        make_config(tta="maybe")


def test_bad_compile_value_is_one_line_on_the_command_line():
    result = run_cli("run", "--compile", "sometimes", "--wandb", "disabled")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "fit: error: --compile 'sometimes' is not accepted; give true or false "
        "(--compile/--nocompile)"
    )


@pytest.mark.slow
def test_compile_falls_back_with_a_clear_message(real_data, tmp_path):
    # a compiler that does not exist makes torch.compile fail the way a machine without one does
    result = run_cli(
        "run", "--data", str(real_data), "--subset", "0.002", "--bs", "100", "--epochs", "1",
        "--compile",
        "--wandb", "disabled", "--out", str(tmp_path / "run"),
        env={"CXX": "/nonexistent/c++", "CC": "/nonexistent/cc"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "--compile" in line]
    assert len(lines) == 1 and lines[0].startswith("fit: --compile could not run here (")
    assert lines[0].endswith("training without torch.compile")
    assert "top-1" in result.stdout and (tmp_path / "run" / "model.pt").is_file()


@pytest.mark.slow
def test_benchmarks_run_in_quick_mode():
    env = {"PYTHONPATH": str(ROOT)}
    for script, pattern in (
        ("bench_step_overhead.py", r"ratio=-?\d+\.\d+ overhead_ms=-?\d+\.\d+"),
        ("bench_data.py", r"ratio=\d+\.\d+"),
    ):
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), "--quick"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**__import__("os").environ, **env},
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert re.fullmatch(pattern, result.stdout.strip().splitlines()[-1]), result.stdout


def test_prepare_and_check_scripts_are_valid_bash():
    for script in ("prepare_device.sh", "gpu_check.sh"):
        path = Path(ROOT / "scripts" / script)
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    usage = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True)
    assert usage.returncode == 2 and b"usage:" in usage.stderr


def test_device_losses_equal_fastai_losses():
    from fastai.learner import AvgLoss, AvgSmoothLoss
    from fastai.torch_core import to_detach as fastai_to_detach

    from cifar100_fit.speed import DeviceAvgLoss, DeviceSmoothLoss

    class Step:
        to_detach = staticmethod(fastai_to_detach)

    ours, theirs = (DeviceAvgLoss(), DeviceSmoothLoss(0.9)), (AvgLoss(), AvgSmoothLoss(0.9))
    for metric in (*ours, *theirs):
        metric.reset()
    for loss, bs in ((2.0, 4), (1.0, 4), (0.5, 2)):
        step = Step()
        step.loss, step.yb = torch.tensor(loss), (torch.zeros(bs, dtype=torch.long),)
        for metric in (*ours, *theirs):
            metric.accumulate(step)
    for mine, fastais in zip(ours, theirs):
        assert float(mine.value) == pytest.approx(float(fastais.value))
    assert float(ours[0].value) == pytest.approx((2 * 4 + 1 * 4 + 0.5 * 2) / 10)
    learn = quiet_learner(bs=50)
    assert isinstance(learn.recorder.smooth_loss, DeviceSmoothLoss)


def test_one_cycle_equals_fastai_combined_cos_at_every_step():
    from fastai.callback.schedule import combined_cos

    from cifar100_fit.speed import OneCycle

    for pct_start in (0.1, 0.25, 0.3, 0.5):
        ours = OneCycle(pct_start, 0.01 / 25, 0.01, 0.01 / 25 / 1e4)
        theirs = combined_cos(pct_start, 0.01 / 25, 0.01, 0.01 / 25 / 1e4)
        for step in range(101):
            # fastai computes the position within a phase in float32: equal to about 1e-6
            assert ours(step / 100) == pytest.approx(float(theirs(step / 100)), rel=1e-5)
    learn = quiet_learner(bs=50)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 0.01)
    moms = combined_cos(0.3, 0.95, 0.85, 0.95)
    assert learn.recorder.hps["mom"] == pytest.approx([moms(i / 4) for i in range(4)], rel=1e-5)
