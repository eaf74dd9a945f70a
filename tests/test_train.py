import json
import math

import pytest
import torch
from fastai.learner import Learner

from cifar100_fit import cifar100_learner
from cifar100_fit.config import ConfigError, make_config
from cifar100_fit.data import load_cifar100
from cifar100_fit.tracking import read_offline_run
from cifar100_fit.train import DIV_FINAL, PCT_START, fit_run


def test_notebook_learner_fits_one_short_epoch(tiny_data):
    learn = cifar100_learner(bs=100, data=load_cifar100(tiny_data))
    assert isinstance(learn, Learner)
    learn.fit_one_cycle(1, 0.01)
    names = learn.recorder.metric_names
    assert list(names[1:-1]) == ["train_loss", "valid_loss", "accuracy", "top5_accuracy"]
    accuracy = learn.recorder.values[-1][2]
    assert 0 <= accuracy <= 1


def test_one_cycle_schedule_follows_the_studys_torch_schedule(tiny_data):
    learn = cifar100_learner(bs=100, data=load_cifar100(tiny_data))
    learn.fit_one_cycle(2, 0.01, wd=0.1)
    lrs = learn.recorder.lrs  # one per step: 4 batches an epoch, 2 epochs

    def cosine(start, end, fraction):
        return end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2

    peak, first, last = 0.01, 0.01 / 25, 0.01 / 25 / 1e4  # torch OneCycleLR's defaults
    expected = [
        cosine(first, peak, pct / 0.3) if pct < 0.3 else cosine(peak, last, (pct - 0.3) / 0.7)
        for pct in (step / 8 for step in range(8))
    ]
    assert lrs == pytest.approx(expected)
    assert (PCT_START, DIV_FINAL) == (0.3, 25 * 1e4)
    assert learn.opt.hypers[0]["wd"] == 0.1
    assert learn.opt.opt.defaults["eps"] == 1e-8 and learn.opt.opt.defaults["betas"][1] == 0.999


def test_loss_falls_when_one_batch_is_overfit(tiny_data):
    learn = cifar100_learner(bs=32, aug="none", label_smoothing=0, data=load_cifar100(tiny_data))
    x, y = learn.dls.train.one_batch()
    x, y = x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)
    learn.create_opt()
    learn.opt.set_hyper("lr", 3e-3)
    losses = []
    learn.model.train()
    for _ in range(15):
        loss = learn.loss_func(learn.model(x), y)
        loss.backward()
        learn.opt.step()
        learn.opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_same_seed_gives_the_same_metrics_on_the_cpu(tiny_data):
    data = load_cifar100(tiny_data)
    results = []
    for _ in range(2):
        learn = cifar100_learner(bs=100, seed=3, data=data)
        learn.fit_one_cycle(1, 0.01)
        results.append(learn.recorder.values[-1])
    assert results[0] == results[1]
    other = cifar100_learner(bs=100, seed=4, data=data)
    other.fit_one_cycle(1, 0.01)
    assert other.recorder.values[-1] != results[0]


def test_show_results_titles_predictions_with_class_names(tiny_data, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learn = cifar100_learner(bs=20, data=load_cifar100(tiny_data))
    learn.show_results(max_n=4)
    titles = [ax.get_title() for ax in plt.gcf().axes if ax.get_title()]
    assert titles and all(t.startswith("class_") for t in titles)
    plt.savefig(tmp_path / "results.png")


@pytest.mark.slow
@pytest.mark.real_data
def test_fit_run_on_real_data_saves_weights_and_an_offline_wandb_run(tmp_path, real_data):
    config = make_config(
        epochs=2,
        subset=0.01,
        bs=50,
        data=str(real_data),
        out=str(tmp_path / "run"),
        wandb="offline",
    )
    summary = fit_run(config, load_cifar100(real_data))
    out = tmp_path / "run"
    assert json.loads((out / "summary.json").read_text())["accuracy"] == summary["accuracy"]
    weights = torch.load(out / "model.pt", weights_only=True)
    assert weights["fc.weight"].shape == (100, 512)
    run = read_offline_run(summary["wandb_offline_dir"])
    assert run.summary["accuracy"] == summary["accuracy"]
    assert run.config["bs"] == 50 and run.config["lr"] == 0.015 and run.config["subset"] == 0.01
    epochs = [row["epoch"] for row in run.history if "accuracy" in row]
    assert epochs == [1, 2]
    assert run.exit_code == 0


def test_half_precision_on_the_cpu_is_refused_with_the_fix(tiny_data):
    with pytest.raises(ConfigError, match="--precision bf16 needs a CUDA GPU; use fp32 or auto"):
        cifar100_learner(precision="bf16", data=load_cifar100(tiny_data))


def test_lr_find_runs_and_suggests_a_learning_rate(tiny_data):
    learn = cifar100_learner(bs=50, data=load_cifar100(tiny_data))
    suggestion = learn.lr_find(end_lr=1, num_it=8, show_plot=False)
    assert 1e-7 < suggestion.valley < 1
