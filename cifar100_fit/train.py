"""The fastai Learner for CIFAR-100 and one full training run, from config to saved weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelEpochException
from fastai.learner import CastToTensor, Learner, Metric
from fastai.optimizer import OptimWrapper
from fastai.torch_core import set_seed
from torch import nn

from .config import ConfigError, RunConfig, make_config
from .data import Cifar100, cifar100_dls, load_cifar100
from .model import create_model, unwrapped
from .runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    atomic_write,
    is_main_process,
    out_folder,
    write_json,
)
from .speed import (
    LeanOptimWrapper,
    QuickEvents,
    compile_model,
    fast_cuda_settings,
    recipe_callbacks,
)
from .tracking import WandbLogger, run_folder

# The study trained with torch's AdamW and OneCycleLR; these keep its optimizer and schedule
# rather than fastai's defaults (eps 1e-5, sqr_mom 0.99, pct_start 0.25, div_final 1e5).
ADAM_EPS = 1e-8
ADAM_BETAS = (0.9, 0.999)
PCT_START = 0.3
DIV = 25.0
# OneCycleLR ends at max_lr / div / final_div_factor = max_lr / 25 / 1e4; fastai divides lr_max.
DIV_FINAL = DIV * 1e4


class SmoothedCrossEntropy(nn.Module):
    """Cross-entropy with label smoothing on plain tensors, with the hooks fastai uses to decode."""

    y_int = True  # integer targets: fastai's mixup/cutmix then mix the losses, not the labels

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing, self.reduction = label_smoothing, "mean"

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            output, target, label_smoothing=self.label_smoothing, reduction=self.reduction
        )

    def activation(self, output: torch.Tensor) -> torch.Tensor:
        return F.softmax(output, dim=-1)

    def decodes(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=-1)


class TopKAccuracy(Metric):
    """Top-k accuracy summed on the model's device and read once per epoch, not once per batch."""

    def __init__(self, k: int = 1, name: str = "accuracy"):
        self.k, self._name = k, name

    def reset(self) -> None:
        self.correct, self.count = 0, 0

    def accumulate(self, learn: Learner) -> None:
        target = learn.yb[0]
        top = learn.pred.topk(self.k, dim=-1).indices
        self.correct += (top == target[:, None]).any(dim=-1).sum()
        self.count += len(target)

    @property
    def value(self) -> float | None:
        return float(self.correct) / self.count if self.count else None

    @property
    def name(self) -> str:
        return self._name


class PlainTensors(Callback):
    """Hand the model plain tensors, channels-last on CUDA.

    fastai's typed tensors (TensorImage, TensorCategory) dispatch every torch call through
    Python; the model and loss do not need the types, only `show_batch` does.
    """

    order = -10

    def before_batch(self) -> None:
        x, y = (t.as_subclass(torch.Tensor) for t in (self.xb[0], self.yb[0]))
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        self.learn.xb, self.learn.yb = (x,), (y,)


class CifarLearner(QuickEvents, Learner):
    """A fastai `Learner` whose `fit_one_cycle` defaults follow the study's torch schedule.

    `QuickEvents` (speed.py) trims fastai's per-step callback cost.
    """

    def fit_one_cycle(
        self,
        n_epoch: int,
        lr_max=None,
        div: float = DIV,
        div_final: float = DIV_FINAL,
        pct_start: float = PCT_START,
        **kwargs,
    ) -> None:
        """Fit `n_epoch` epochs with the one-cycle policy."""
        super().fit_one_cycle(
            n_epoch, lr_max, div=div, div_final=div_final, pct_start=pct_start, **kwargs
        )

    def _do_fit(self) -> None:
        # A resumed run starts at `first_epoch`; fastai's own start_epoch would still run every
        # skipped epoch's callbacks and log empty rows. The schedule reads epoch / n_epoch.
        for epoch in range(getattr(self, "first_epoch", 0), self.n_epoch):
            self.epoch = epoch
            self._with_events(self._do_epoch, "epoch", CancelEpochException)


def adamw(params, lr: float, **kwargs) -> OptimWrapper:
    """torch's AdamW (decoupled weight decay: p <- p - lr*wd*p) wrapped for fastai's schedules."""
    on_cuda = any(p.is_cuda for p in params) if isinstance(params, list) else False
    return LeanOptimWrapper(
        params,
        torch.optim.AdamW,
        lr=lr,
        eps=ADAM_EPS,
        betas=ADAM_BETAS,
        fused=on_cuda or None,
        **kwargs,
    )


def cifar100_learner(
    config: RunConfig | None = None, data: Cifar100 | None = None, **overrides: Any
) -> CifarLearner:
    """A fastai Learner for ResNet18 on CIFAR-100, e.g. `cifar100_learner(bs=256)`.

    Args:
        config: a full `RunConfig`; keyword overrides apply on top of it.
        data: CIFAR-100 already read from disk; read from `config.data` when omitted.
    """
    config = make_config(**{**(config.to_dict() if config else {}), **overrides})
    set_seed(config.seed, reproducible=True)
    dls = cifar100_dls(
        config.bs,
        config.subset,
        config.valid,
        config.aug,
        data if data is not None else load_cifar100(config.data or None),
    )
    model = create_model(config.arch).to(dls.device)
    on_cuda = dls.device.type == "cuda"
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    learn = CifarLearner(
        dls,
        model,
        loss_func=SmoothedCrossEntropy(config.label_smoothing),
        opt_func=adamw,
        lr=config.lr,
        wd=config.wd,
        metrics=[TopKAccuracy(1, "accuracy"), TopKAccuracy(5, "top5_accuracy")],
        cbs=[PlainTensors(), *recipe_callbacks(config)],
        path=config.out or ".",
    )
    learn.remove_cb(CastToTensor)  # PlainTensors already hands the model plain tensors
    precision = _precision(config.precision, on_cuda)
    if precision != "fp32":
        learn.to_bf16() if precision == "bf16" else learn.to_fp16()
    return learn


def _precision(requested: str, on_cuda: bool) -> str:
    if requested == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_cuda else "fp32"
    if requested != "fp32" and not on_cuda:
        raise ConfigError(f"--precision {requested} needs a CUDA GPU; use fp32 or auto on the CPU")
    return requested


def fit_run(
    config: RunConfig, data: Cifar100 | None = None, cbs: list | None = None, **init_kwargs: Any
) -> dict[str, Any] | None:
    """Train one run as `config` says, log it to W&B and save it; return its summary.

    Continues from `checkpoint.pt` in the run folder when one is there. Under torchrun or
    accelerate every process trains its shard; rank 0 logs and saves, and alone gets the summary.

    Args:
        cbs: extra fastai callbacks for this fit, e.g. a sweep's early-stopping rule.
        init_kwargs: passed on to `wandb.init`, e.g. `group=` to gather a sweep's runs.
    """
    from .checkpoint import (
        RunInterrupted,
        WandbRowSent,
        note_wandb_kept,
        sigterm_as_interrupt,
        start_or_resume,
    )
    from .distributed import data_parallel, prepare_process

    out = out_folder(config)
    config = make_config(**{**config.to_dict(), "out": str(out)})
    prepare_process(config)
    learn = data_parallel(cifar100_learner(config, data), config)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_FILE, config.to_dict())
    checkpoint, run = start_or_resume(learn, config, out / CHECKPOINT_FILE, **init_kwargs)
    sent = WandbRowSent(checkpoint.first_epoch)
    try:
        if learn.dls.device.type == "cuda":
            fast_cuda_settings()
        compile_s = compile_model(learn, learn_precision(learn)) if config.compile else 0.0
        with sigterm_as_interrupt():
            logging = [WandbLogger(), sent] if run is not None else []
            cbs = [checkpoint, *logging, *(cbs or [])]
            learn.fit_one_cycle(config.epochs, config.lr, wd=config.wd, cbs=cbs)
        if run is None:
            return None
        summary = _summary(learn, config, checkpoint.wall_s, run)
        summary.update(compile_s=round(compile_s, 2), device=_device_name(learn.dls.device))
        run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        save_run(learn, config, summary)
    except KeyboardInterrupt:
        if run is not None:
            run.mark_preempting()
            run.finish(exit_code=130)  # marks the W&B run as failed, not finished
            note_wandb_kept(out, run.id, sent.epochs_sent)
            run = None
        raise RunInterrupted(out, checkpoint.epochs_done, config.epochs) from None
    finally:
        if run is not None:
            run.finish()
    return summary


def learn_precision(learn: Learner) -> str:
    """The autocast precision `learn` trains in: bf16, fp16 or fp32."""
    mixed = getattr(learn, "mixed_precision", None)
    return str(getattr(mixed.amp_mode, "value", mixed.amp_mode)) if mixed else "fp32"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _summary(learn: Learner, config: RunConfig, wall: float, run) -> dict[str, Any]:
    names = list(learn.recorder.metric_names[1:-1])  # the columns of recorder.values
    history = [dict(zip(names, values)) for values in learn.recorder.values]
    return dict(
        accuracy=history[-1]["accuracy"],
        top5_accuracy=history[-1]["top5_accuracy"],
        best_accuracy=max(epoch["accuracy"] for epoch in history),
        valid_loss=history[-1]["valid_loss"],
        epochs=config.epochs,
        wall_s=round(wall, 2),
        images_per_s=round(config.epochs * len(learn.dls.train) * config.bs / wall, 1),
        history=history,
        out=config.out,
        wandb_offline_dir=run_folder(run) if run.settings.mode == "offline" else "",
        wandb_url=run.url or "" if run.settings.mode == "online" else "",
    )


def save_run(learn: Learner, config: RunConfig, summary: dict[str, Any]) -> None:
    """Write the weights (`model.pt`), then `summary.json`, into the run folder."""
    out = Path(config.out)
    model = unwrapped(learn.model)
    atomic_write(out / WEIGHTS_FILE, lambda path: torch.save(model.state_dict(), path))
    write_json(out / SUMMARY_FILE, summary)
    # a finished run is never resumed: its checkpoint (model, optimizer, RNG) is dead weight
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
