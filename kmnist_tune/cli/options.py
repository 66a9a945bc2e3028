"""Options shared by several commands, and the few helpers every command uses to print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UserError
from ..masking import mask

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        metavar="URL",
        help="Optuna storage URL (env KMNIST_TUNE_STORAGE; default sqlite:///kmnist-tune.db in the working directory)",
        show_default=False,
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", metavar="DIR", help="data folder (env KMNIST_TUNE_DATA; default ~/.cache/kmnist-tune)", show_default=False
    ),
]
MirrorOpt = Annotated[
    str | None,
    typer.Option(
        "--mirror",
        metavar="URL",
        help="base URL to download from (env KMNIST_TUNE_MIRROR; default the official CODH site)",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", metavar="auto|cpu|cuda", help="auto (CUDA if present, else CPU), cpu, or cuda")
]
GpusOpt = Annotated[
    str,
    typer.Option(
        "--gpus",
        metavar="LIST",
        help="all, none, auto (all if any), or indices like 0,2: "
        "one worker process per GPU slot, pinned with CUDA_VISIBLE_DEVICES",
    ),
]
PerGpuOpt = Annotated[
    int, typer.Option("--per-gpu", metavar="K", help="trial processes per GPU (small ResNets leave a GPU mostly idle)", min=1)
]
ThreadsOpt = Annotated[
    str | None,
    typer.Option(
        "--threads",
        metavar="N",
        help="CPU threads per training process (env KMNIST_TUNE_THREADS; default auto: "
        "this host's cores divided among the training processes running on it)",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]

# A study is named with --study NAME in every command; a bare NAME is accepted too.
StudyArg = Annotated[str | None, typer.Argument(metavar="STUDY", help="the study (or --study NAME)", show_default=False)]
StudyOpt = Annotated[str | None, typer.Option("--study", "-s", metavar="NAME", help="the study's name", show_default=False)]


def study_name(positional: str | None, option: str | None) -> str:
    if positional and option and positional != option:
        raise UserError(f"two study names given ({positional!r} and --study {option!r}); give one")
    name = option or positional
    if not name:
        raise UserError("which study? name it with --study NAME (`kmnist-tune study list` shows them)")
    return name


def out(text: str = "") -> None:
    """A line of the command's result on stdout, passwords masked."""
    print(mask(text), flush=True)


def out_lines(lines: list[str]) -> None:
    for line in lines:
        out(line)


def say(text: str) -> None:
    """A line about what is happening, on stderr, passwords masked."""
    print(mask(text), file=sys.stderr, flush=True)


def work_is_done() -> None:
    """From here on a stop signal is ignored: the work is stored and the summary follows, so the second
    or two of teardown after it (W&B, connections, the interpreter) ends with status 0, which is no failure
    to a Kubernetes Job or compose's `on-failure`. Ignored, not handled: Python puts its own handlers back
    to the default (exit 143) while the interpreter finalises, but leaves an ignored signal ignored."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def out_json(data: Any) -> None:
    out(json.dumps(data, indent=2, default=str))


def storage_url(storage: str | None) -> str:
    from ..service.storage import resolve_url

    return resolve_url(storage)


def use_threads(threads: str | None) -> None:
    """`--threads N`: checked here, handed to this process and its slot processes by environment."""
    import os

    from ..service.cpu_share import THREADS_ENV, fixed_threads

    if threads is None:
        fixed_threads()  # KMNIST_TUNE_THREADS, if set
    else:
        fixed_threads(threads, "--threads ")
        os.environ[THREADS_ENV] = threads.strip()


def plan_slots(gpus: str, per_gpu: int) -> list[Any]:
    from ..service.slots import make_slots, parse_gpus
    from ..training.devices import visible_gpu_count

    return make_slots(parse_gpus(gpus, visible_gpu_count()), per_gpu)
