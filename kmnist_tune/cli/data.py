"""`kmnist-tune data ...`: download, verify and describe the data sets (no torch)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UserError
from .apps import data_app
from .options import DataDirOpt, JsonOpt, MirrorOpt, out, out_json, say

DatasetOpt = Annotated[str, typer.Option("--dataset", help="kmnist or k49")]
FormatOpt = Annotated[
    str | None, typer.Option("--format", help="npz or idx (default: every format the data set has)", show_default=False)
]


@data_app.command("fetch")
def data_fetch(
    dataset: DatasetOpt = "kmnist",
    fmt: Annotated[str, typer.Option("--format", help="npz or idx")] = "npz",
    data_dir: DataDirOpt = None,
    mirror: MirrorOpt = None,
) -> None:
    """Download the official files that are missing or do not verify (md5)."""
    from ..training.data import fetch, get_dataset, resolve_data_dir

    info = get_dataset(dataset)
    if fmt not in info.formats:
        raise UserError(f"--format {fmt!r}: {dataset} comes as {', '.join(info.formats)}")
    folder = resolve_data_dir(data_dir)
    last = {"name": ""}

    def progress(name: str, done: int, total: int | None) -> None:
        if name != last["name"]:
            last["name"] = name
            say(f"downloading {name}" + (f" ({total:,} bytes)" if total else ""))

    paths = fetch(dataset, folder, fmt=fmt, mirror=mirror, progress=progress)
    out(f"{dataset} ({fmt}) verified in {folder}: {len(paths)} files")


@data_app.command("verify")
def data_verify(dataset: DatasetOpt = "kmnist", fmt: FormatOpt = None, data_dir: DataDirOpt = None) -> None:
    """Check the md5 of every file; exits non-zero if any is missing or corrupt."""
    from ..training.data import get_dataset, resolve_data_dir, verify

    get_dataset(dataset)
    folder = resolve_data_dir(data_dir)
    statuses = verify(dataset, folder, fmt)
    for s in statuses:
        out(f"{s.state:8s} {s.path.name}" + (f"  ({s.detail})" if s.detail else ""))
    bad = [s for s in statuses if s.state != "ok"]
    if bad:
        raise UserError(
            f"{len(bad)} of {len(statuses)} {dataset} files in {folder} are missing or do not verify; "
            f"run `kmnist-tune data fetch --dataset {dataset} --data-dir {folder}`"
        )


@data_app.command("info")
def data_info(dataset: DatasetOpt = "kmnist", data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """Describe a data set and which of its files are present."""
    from ..training.data import get_dataset, resolve_data_dir, resolve_mirror, verify

    info = get_dataset(dataset)
    folder = resolve_data_dir(data_dir)
    source = f"{resolve_mirror(None)}/{info.name}/"
    statuses = verify(dataset, folder)
    if as_json:
        files = [{"name": s.path.name, "state": s.state, "detail": s.detail} for s in statuses]
        out_json(
            {
                "dataset": info.name,
                "n_classes": info.n_classes,
                "formats": list(info.formats),
                "data_dir": str(folder),
                "download_from": source,
                "files": files,
            }
        )
        return
    out(f"{info.name}: {info.n_classes} classes, formats {', '.join(info.formats)}")
    out(f"data dir: {folder}")
    out(f"download from: {source}")
    for s in statuses:
        out(f"{s.state:8s} {s.path.name}")
