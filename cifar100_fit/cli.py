"""The `fit` command line (python-fire): it checks arguments, then wires the parts together.

Heavy libraries are imported inside the commands, after the arguments have been checked.
"""

from __future__ import annotations

import inspect
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fire

from .config import FLAGS, ConfigError, make_config
from .files import DataError, load_cifar100
from .runs import CHECKPOINT_FILE, is_main_process, out_folder, prepare_out, summary_line


class UsageError(ValueError):
    """A command line that cannot be run; the message says what is accepted."""


def _with_run_flags(command: Callable) -> Callable:
    """Give `command(**flags)` a signature and an Args docstring listing every run flag.

    fire reads both, so `fit run --help` shows each flag with its default and meaning.
    """
    own = [
        p
        for p in inspect.signature(command).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    # a command's own parameter (e.g. `fit repeat --epochs 30,50`) takes the place of the run flag
    shared = {name: spec for name, spec in FLAGS.items() if name not in {p.name for p in own}}
    flags = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=spec.default)
        for name, spec in shared.items()
    ]
    command.__signature__ = inspect.Signature(own + flags)
    args = "\n".join(f"    {name}: {spec.metadata['help']}" for name, spec in shared.items())
    doc = inspect.cleandoc(command.__doc__)
    command.__doc__ = f"{doc}\n{args}\n" if "Args:" in doc else f"{doc}\n\nArgs:\n{args}\n"
    return command


@_with_run_flags
def run(resume: bool = False, **flags: Any) -> None:
    """Train ResNet18 on CIFAR-100 with fastai's fit_one_cycle and log the run to W&B.

    A run saves a checkpoint after each epoch; running the same command again (or with
    --resume, which insists on a checkpoint) continues after the last saved epoch. Under
    `torchrun --nproc_per_node N -m cifar100_fit run` or `accelerate launch --multi_gpu
    --num_processes N -m cifar100_fit run`, --bs is the global batch of one step (bs/N per
    process) and must be a multiple of N.

    Args:
        resume: continue the run in --out from its checkpoint.pt; refused when there is none
    """
    config = make_config(**flags)
    finished = prepare_out(config)
    if finished is not None:
        if is_main_process():
            print(f"already finished: {summary_line(finished)}")
        return
    if resume and not (out_folder(config) / CHECKPOINT_FILE).is_file():
        raise UsageError(
            f"--resume: no {CHECKPOINT_FILE} in {out_folder(config)}; "
            "run without --resume to start this run"
        )
    data = load_cifar100(config.data or None)

    from .train import fit_run

    summary = fit_run(config, data)
    if summary is not None:
        print(summary_line(summary))


def evaluate(path: str, tta: bool | None = None, data: str = "", bs: int = 0) -> None:
    """Report top-1/top-5 accuracy on the test images of a saved run.

    Args:
        path: a run's model.pt (with config.json beside it) or checkpoint.pt
        tta: --tta averages the logits of each image and its mirror, --notta does not
            (default: as the run was evaluated)
        data: folder holding cifar-100-python/ (default: the run's --data)
        bs: batch size as in `fit run --bs` (default: the run's); evaluation uses twice it
    """
    from .evaluate import evaluate_file

    tta = None if tta is None else bool(tta)
    print(evaluate_file(path, tta=tta, data=data, bs=int(bs)).line)


@_with_run_flags
def sweep(config: str, count: int = 10, controller: str = "", **flags: Any) -> None:
    """Run the W&B sweep in a YAML file until it holds COUNT finished trials.

    Args:
        config: a W&B sweep YAML, e.g. configs/bs256-e30.yaml
        count: finished trials to reach (local) or runs for this machine's agent (wandb)
        controller: local (the sweeps package's engine, here; default without a W&B login)
            or wandb (W&B's server; default when logged in)
    """
    from .studies import sweep_command

    sweep_command(config, count, controller, flags)


@_with_run_flags
def agent(sweep_id: str, count: int = 0, **flags: Any) -> None:
    """Join a sweep on W&B's server from this machine (`wandb agent`, with data read once).

    Args:
        sweep_id: the id `fit sweep --controller wandb` or `wandb sweep` printed
        count: runs to train before stopping; 0 trains until the sweep ends
    """
    from .studies import agent_command

    agent_command(sweep_id, count, flags)


@_with_run_flags
def repeat(epochs: Any = (30, 50), times: int = 10, **flags: Any) -> None:
    """Train each epochs setting with seeds 0..TIMES-1, then tabulate and box-plot final accuracy.

    Args:
        epochs: epoch counts to compare, separated by commas: --epochs 30,50
        times: seeds per setting
    """
    from .studies import repeat_command

    repeat_command(epochs, times, flags)


def report(folder: str, top: int = 10) -> None:
    """Print the best trials of a sweep or repeat folder; write report.md and its PNG plot.

    Args:
        folder: a folder made by `fit sweep` or `fit repeat`, e.g. runs/sweeps/bs256-e30
        top: number of trials in a sweep's table
    """
    from .studies import report_command

    report_command(folder, top)


COMMANDS: dict[str, Callable] = {
    "run": run,
    "sweep": sweep,
    "agent": agent,
    "repeat": repeat,
    "report": report,
    "evaluate": evaluate,
}


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        launcher = f"torchrun --nproc_per_node {processes} -m cifar100_fit"
    elif Path(sys.argv[0]).name == "__main__.py":
        launcher = "python -m cifar100_fit"
    else:
        launcher = "fit"
    resume = [] if "--resume" in argv else ["--resume"]
    return f"{launcher} {shlex.join(argv + resume)}"


def check_command_line(argv: list[str]) -> None:
    """Refuse an unknown command or flag with one line, before fire prints a usage screen."""
    if not argv or argv[0].startswith("-"):
        return
    command = COMMANDS.get(argv[0])
    if command is None:
        raise UsageError(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}")
    parameters = inspect.signature(command).parameters
    for token in argv[1:]:
        if token == "--":
            break
        if not token.startswith("--") or token in ("--help", "--helpfull"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name in parameters or (name.startswith("no") and name[2:] in parameters):
            continue
        accepted = ", ".join(f"--{p}" for p in parameters)
        raise UsageError(f"unknown flag --{name} for 'fit {argv[0]}'; accepted: {accepted}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `fit` and `python -m cifar100_fit`."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_command_line(argv)
        fire.Fire(COMMANDS, command=argv, name="fit")
    except (UsageError, ConfigError, DataError) as error:
        print(f"fit: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        if is_main_process():
            print(f"fit: {interrupted_message(interrupt, argv)}", file=sys.stderr)
        sys.exit(130)


def interrupted_message(interrupt: KeyboardInterrupt, argv: list[str]) -> str:
    """What an interrupted run kept, and the command that continues it."""
    epochs_done = getattr(interrupt, "epochs_done", None)
    if epochs_done is None:
        return "interrupted"
    if epochs_done == 0:
        return "interrupted before the first epoch ended; nothing to resume, run it again to start"
    checkpoint = Path(interrupt.out) / CHECKPOINT_FILE
    return (
        f"interrupted; epochs 1-{epochs_done} of {interrupt.epochs} are saved in {checkpoint}; "
        f"resume with: {resume_command(argv)}"
    )
