"""The fast path: cheap callback dispatch, a quiet progress bar, torch.compile with its own clock,
and the recipe callbacks (mixup/cutmix, flip test-time augmentation, an EMA of the weights).

Where fastai's per-step cost went, measured with cProfile on the CPU (trivial model, bs 64):
- every event asked every callback for a method it mostly lacks, and each miss went through two
  `GetAttr.__getattr__` forwards (callback -> learner -> model) before failing: ~8 events x 5
  callbacks per step;
- the smoothed loss was copied to the host every step, and the progress bar formatted it with
  `.item()` after every batch: two GPU syncs per step;
- `OptimWrapper.hypers` rebuilt a dict per group three times a step (scheduler and recorder);
- the one-cycle schedules ran tensor and numpy operations to compute two floats a step.
`scripts/bench_step_overhead.py` shows what is left against a plain PyTorch loop.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext

import torch
from fastai.callback import core as core_callbacks
from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import ParamScheduler
from fastai.learner import AvgLoss, AvgSmoothLoss, Learner, Recorder
from fastai.optimizer import OptimWrapper, set_item_pg
from fastai.torch_core import find_bs, to_detach
from fastcore.foundation import L
from fastcore.xtras import modify_exception

from .config import RunConfig

_INNER_LOOP = frozenset(core_callbacks._inner_loop)
_CANCELS = tuple(
    getattr(core_callbacks, name) for name in dir(core_callbacks) if name.startswith("Cancel")
)


def _defines(callback: Callback, event_name: str) -> bool:
    """Whether `callback` itself handles `event_name` (not by forwarding to the learner)."""
    if event_name in vars(callback):
        return True
    return any(event_name in vars(kind) for kind in type(callback).__mro__)


class OneCycle:
    """fastai's `combined_cos`: cosine from `start` to `middle` over `pct_start`, then to `end`.

    fastai's version runs tensor and numpy operations on every call (twice a step); this is
    the same arithmetic on Python floats.
    """

    def __init__(self, pct_start: float, start: float, middle: float, end: float):
        self.pct_start, self.start, self.middle, self.end = pct_start, start, middle, end

    def __call__(self, pct: float) -> float:
        if pct >= 1:
            return self.end
        if pct < self.pct_start:
            return _cos(self.start, self.middle, pct / self.pct_start)
        return _cos(self.middle, self.end, (pct - self.pct_start) / (1 - self.pct_start))


def _cos(start: float, end: float, pos: float) -> float:
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


class QuickEvents:
    """A `Learner` mixin that calls, for each event, only the callbacks that handle it.

    The table of handlers is rebuilt whenever the list of callbacks changes. Each call does what
    `Callback.__call__` does (`run`, `run_train`, `run_valid`, fastai's error message), reading
    the learner's `training` flag once per event; a callback with its own `__call__` keeps it.
    fastai's progress bar is swapped for `QuietProgress` whenever it is added (also by `no_bar`).
    NOTE: a handler must be a method of the callback's class or instance, as fastai's all are; one
    served by a `__getattr__` is not seen.
    """

    def add_cb(self, cb):
        if isinstance(cb, type):
            cb = cb()
        if type(cb) is ProgressCallback:
            cb = QuietProgress()
        if isinstance(cb, Recorder):
            cb.loss, cb.smooth_loss = DeviceAvgLoss(), DeviceSmoothLoss(cb.smooth_loss.beta)
        self._handlers_key = None
        return super().add_cb(cb)

    def remove_cb(self, cb):
        self._handlers_key = None
        return super().remove_cb(cb)

    def fit_one_cycle(
        self,
        n_epoch: int,
        lr_max=None,
        div: float = 25.0,
        div_final: float = 1e5,
        pct_start: float = 0.25,
        wd=None,
        moms=None,
        cbs=None,
        reset_opt: bool = False,
        start_epoch: int = 0,
    ) -> None:
        """fastai's `fit_one_cycle`, with its schedules on plain floats for one parameter group."""
        if self.opt is None:
            self.create_opt()
        self.opt.set_hyper("lr", self.lr if lr_max is None else lr_max)
        groups = self.opt.hypers
        if len(groups) != 1:  # one lr per group: fastai's own array-valued schedules
            return super().fit_one_cycle(
                n_epoch, lr_max, div, div_final, pct_start, wd, moms, cbs, reset_opt, start_epoch
            )
        lr = float(groups[0]["lr"])
        scheds = {
            "lr": OneCycle(pct_start, lr / div, lr, lr / div_final),
            "mom": OneCycle(pct_start, *(self.moms if moms is None else moms)),
        }
        self.fit(
            n_epoch,
            cbs=ParamScheduler(scheds) + L(cbs),
            reset_opt=reset_opt,
            wd=wd,
            start_epoch=start_epoch,
        )

    def _set_device(self, batch):
        # TensorDL cuts batches on the data's device already: skip fastai's walk and .to() calls
        device = getattr(self.dls, "device", None)
        on_device = all(isinstance(t, torch.Tensor) and t.device == device for t in batch)
        if on_device and next(self.model.parameters()).device == device:
            return batch
        return super()._set_device(batch)

    def __call__(self, event_name) -> None:
        if isinstance(event_name, str):
            self._call_one(event_name)
        else:
            for name in event_name:
                self._call_one(name)

    def _call_one(self, event_name: str) -> None:
        # add_cb and remove_cb clear the table; the key also catches a replaced or appended list
        key = (id(self.cbs), len(self.cbs))
        if getattr(self, "_handlers_key", None) != key:
            self._handlers_key, self._handlers = key, {}
        handlers = self._handlers.get(event_name)
        if handlers is None:
            callbacks = self.cbs.sorted("order")
            # after_fit goes to every callback: Callback.__call__ resets `run` there
            handlers = [
                cb for cb in callbacks if event_name == "after_fit" or _defines(cb, event_name)
            ]
            self._handlers[event_name] = handlers
        inner = event_name in _INNER_LOOP
        training = self.training
        for callback in handlers:
            if type(callback).__call__ is not Callback.__call__:
                callback(event_name)
                continue
            # What Callback.__call__ does, with `training` read once from the learner rather than
            # by every callback through fastcore's attribute forwarding
            wanted = not inner or (callback.run_train if training else callback.run_valid)
            handles = event_name != "after_fit" or _defines(callback, event_name)
            if callback.run and wanted and handles:
                try:
                    getattr(callback, event_name)()
                except _CANCELS:
                    raise
                except Exception as error:
                    where = f"in `{type(callback).__name__}` when calling event `{event_name}`"
                    message = error.args[0] if error.args else ""
                    # the same exception object, its message extended: no new link in the chain
                    raise modify_exception(  # noqa: B904
                        error, f"Exception occured {where}:\n\t{message}", replace=True
                    )
            if event_name == "after_fit":
                callback.run = True  # fastai re-enables every callback at the end of a fit


class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's smoothed training loss, kept on the loss's device.

    fastai's own copies the loss to the host every step (`to_detach(..., cpu=True)`), a GPU sync
    that stops the host from queueing the next steps while the GPU works.
    """

    def accumulate(self, learn: Learner) -> None:
        self.count += 1
        loss = to_detach(learn.loss.mean(), cpu=False).float()
        self.val = torch.lerp(loss, self.val.to(loss.device), self.beta)


class DeviceAvgLoss(AvgLoss):
    """fastai's average validation loss, summed on the loss's device and read once per epoch."""

    def accumulate(self, learn: Learner) -> None:
        bs = find_bs(learn.yb)
        self.total += to_detach(learn.loss.mean(), cpu=False).float() * bs
        self.count += bs


class QuietProgress(ProgressCallback):
    """fastai's progress bar, reading the smoothed loss only when the bar is about to redraw."""

    @property
    def name(self) -> str:
        return "progress"  # fastai's `no_bar` and `learn.progress` look for this name

    def after_batch(self) -> None:
        bar, step = self.pbar, self.iter + 1
        redraw = bar.last_v is None or step >= bar.last_v + bar.wait_for or step >= bar.total
        if redraw and self.training and hasattr(self, "smooth_loss"):
            bar.comment = f"{float(self.smooth_loss):.4f}"
        bar.update(step)


class LeanOptimWrapper(OptimWrapper):
    """fastai's `OptimWrapper` with a cheaper `hypers`; the values are read from torch each time."""

    @property
    def hypers(self) -> list[dict]:
        groups = []
        for group in self.opt.param_groups:
            hypers = {}
            for key, value in group.items():
                if key == "params":
                    continue
                if isinstance(value, tuple):
                    for i, item in enumerate(value):
                        hypers[self.fwd_map.get(f"{key}__{i}", f"{key}__{i}")] = item
                else:
                    hypers[self.fwd_map.get(key, key)] = value
            groups.append(hypers)
        return groups

    def set_hyper(self, k, v) -> None:
        if not isinstance(v, (int, float)):
            return super().set_hyper(k, v)
        key = self.bwd_map[k]
        for group in self.opt.param_groups:
            set_item_pg(group, key, v)


class FlipTTA(Callback):
    """Evaluate on the mean of the logits of each image and its mirror image (`--tta`)."""

    order, run_train = 20, False  # after MixedPrecision (10) has made the prediction float

    def after_pred(self) -> None:
        images = self.xb[0]
        layout = torch.channels_last if images.is_cuda else torch.contiguous_format
        # the same strides as the plain batch, so a compiled model is not compiled again
        mirrored = self.model(images.flip(-1).contiguous(memory_format=layout))
        self.learn.pred = (self.pred + mirrored.float()) / 2


class WeightEMA(Callback):
    """Keep an exponential moving average of the weights and evaluate with it (`--ema`).

    Batch-norm statistics stay the live ones. When fitting ends the average replaces the
    trained weights, so the saved model is the one that was evaluated.
    """

    order = 70

    def __init__(self, decay: float):
        self.decay = decay

    def before_fit(self) -> None:
        self.average = [p.detach().clone() for p in self.model.parameters()]

    def after_step(self) -> None:
        current = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(self.average, current, 1 - self.decay)

    def before_validate(self) -> None:
        self._swap()

    def after_validate(self) -> None:
        self._swap()

    def after_fit(self) -> None:
        if hasattr(self, "average"):
            with torch.no_grad():
                for param, average in zip(self.model.parameters(), self.average):
                    param.copy_(average)
            del self.average

    def _swap(self) -> None:
        # swapping storage, not copying: the optimizer state stays bound to the same Parameters
        for i, param in enumerate(self.model.parameters()):
            param.data, self.average[i] = self.average[i], param.data


def recipe_callbacks(config: RunConfig) -> list[Callback]:
    """The callbacks that `--mix`, `--tta` and `--ema` ask for."""
    callbacks: list[Callback] = []
    if config.mix == "mixup":
        callbacks.append(MixUp(config.mix_alpha))
    elif config.mix == "cutmix":
        callbacks.append(CutMix(config.mix_alpha))
    if config.tta:
        callbacks.append(FlipTTA())
    if config.ema:
        callbacks.append(WeightEMA(config.ema))
    return callbacks


def fast_cuda_settings() -> None:
    """Let cuDNN pick its fastest convolution algorithms and fp32 matmuls use TF32.

    `set_seed(reproducible=True)` pins cuDNN to deterministic algorithms, which are slower; on a
    GPU a run is then repeatable only up to the order of floating-point sums, not bit for bit.
    """
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    torch.set_float32_matmul_precision("high")


def compile_model(learn: Learner, precision: str) -> float:
    """Compile `learn.model` in place and run it once at every shape a fit will use.

    Returns the seconds spent, so the run can report them apart from training time. Where
    torch.compile cannot run, the model stays eager and one line on stderr says why.
    """
    start = time.perf_counter()
    model = learn.model
    model.compile()
    try:
        _run_every_shape(learn, precision)
    except Exception as error:  # noqa: BLE001 - any compiler failure means: train eagerly
        model._compiled_call_impl = None
        torch._dynamo.reset()
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        print(
            f"fit: --compile could not run here ({type(error).__name__}: {reason}); "
            "training without torch.compile",
            file=sys.stderr,
        )
        return 0.0
    return time.perf_counter() - start


def _run_every_shape(learn: Learner, precision: str) -> None:
    """One training forward/backward and one evaluation forward per batch size, weights kept."""
    model, dls = learn.model, learn.dls
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    memory = torch.channels_last if dls.device.type == "cuda" else torch.contiguous_format
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(dls.device.type, dtype=dtype) if dtype else nullcontext()
    images = torch.randn(dls.train.bs, 3, 32, 32, device=dls.device)
    try:
        with autocast:
            model.train()
            model(images.contiguous(memory_format=memory)).float().mean().backward()
            model.eval()
            n_valid = len(dls.valid.dataset)
            sizes = {min(dls.valid.bs, n_valid), n_valid % dls.valid.bs} - {0}
            with torch.no_grad():
                for size in sizes:
                    batch = torch.randn(size, 3, 32, 32, device=dls.device)
                    model(batch.contiguous(memory_format=memory))
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
        model.train()
