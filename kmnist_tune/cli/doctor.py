"""`kmnist-tune doctor`: would a worker work on this host? One row per check, failing rows first."""

from __future__ import annotations

from typing import Annotated

import typer

from .apps import app
from .options import DataDirOpt, JsonOpt, StorageOpt, out, out_json

DATASETS = ("kmnist", "k49")


@app.command()
def doctor(
    storage: StorageOpt = None,
    data_dir: DataDirOpt = None,
    dataset: Annotated[str, typer.Option("--dataset", metavar="NAME", help="the data set to check: kmnist, k49, all")] = "kmnist",
    no_compile: Annotated[bool, typer.Option("--no-compile", help="skip the tiny torch.compile (seconds on a CPU)")] = False,
    compile_timeout: Annotated[
        float, typer.Option("--compile-timeout", metavar="S", help="how long the tiny compile may take", min=1)
    ] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Check this host before attaching workers: Python, torch, CUDA and the driver, every GPU, NVIDIA's
    MPS, a real tiny torch.compile, the C compilers, the storage (reachable, schema current), the data
    files (md5), W&B, the signing key, free disk. Exits 0 when a worker would work here, else 1 with
    the failing rows first. Passwords and keys are never printed."""
    from ..contract.checks import table, verdict
    from ..errors import UserError
    from ..observe import doctor as host
    from ..training import data as kdata
    from ..training import doctor as dev

    names = DATASETS if dataset == "all" else (dataset,)
    if dataset != "all" and dataset not in kdata.DATASETS:
        raise UserError(f"--dataset {dataset!r}: use kmnist, k49 or all")
    folder = kdata.resolve_data_dir(data_dir)
    smi = dev.nvidia_smi()  # the GPUs' busy memory before the compile probe takes some
    compiling = None if no_compile else dev.CompileRun("auto", compile_timeout)  # runs while the rest is checked
    checks = [dev.python_check(), dev.torch_check(), dev.fastai_check(), *dev.gpu_checks(smi)]
    gpus = sum(c.name.startswith("gpu ") for c in checks)
    checks.append(host.mps_check(gpus))
    checks.append(host.compiler_check())
    later = [host.storage_check(storage), *(dev.data_check(name, folder) for name in names)]
    later += [host.wandb_check(), host.signing_check(storage), host.disk_check(folder)]
    checks += [dev.compile_skipped() if compiling is None else compiling.check(), *later]
    ok, line = verdict(checks)
    if as_json:
        out_json({"ok": ok, "verdict": line, "checks": [c.as_json() for c in checks]})
    else:
        for row in table(checks):
            out(row)
        out(line)
    if not ok:
        raise typer.Exit(1)
