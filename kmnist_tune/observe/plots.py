"""Matplotlib figures written as PNG files: the LR-finder curve, and the helpers the report uses."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from ..contract.records import LRPrior
from ..errors import UserError

FORMATS = (".png", ".pdf", ".svg")


def writable_folder(folder: Path, option: str) -> Path:
    """`folder`, made if missing; one line saying why when it cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder}: a file is there, not a folder; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{option} {folder}: cannot write there ({e.strerror}); choose another folder") from None
    return folder


def image_path(path: Path, option: str) -> Path:
    """A path to write a figure to: a known format, not a folder, in a folder that can be written."""
    if path.is_dir():
        raise UserError(f"{option} {path}: a folder; give a file name ending in {', '.join(FORMATS)}")
    if path.suffix.lower() not in FORMATS:
        kind = path.suffix or "a file without a suffix"
        raise UserError(f"{option} {path}: cannot write {kind}; end the name in {', '.join(FORMATS)}")
    writable_folder(path.parent, option)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def placeholder(path: Path, title: str, why: str) -> Path:
    """A figure that says why there is nothing to plot yet."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_axes(ax: Any, path: Path) -> Path:
    fig = ax.figure
    fig.set_size_inches(8, 4.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def finish(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and trial numbers are whole
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path


def plot_prior(prior: LRPrior, path: Path, title: str = "") -> Path:
    """A PNG of the smoothed loss against the learning rate, suggestions and search range marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(prior.lrs, prior.losses, color="#1f77b4", label="smoothed training loss")
    ax.set_xscale("log")
    ax.axvspan(prior.low, prior.high, color="#2ca02c", alpha=0.12, label=f"search range ({prior.width:g} decades)")
    colours = {"minimum": "#d62728", "steep": "#ff7f0e", "valley": "#9467bd"}
    for name, lr in prior.suggestions.items():
        style = "-" if name == prior.suggestion else ":"
        ax.axvline(lr, color=colours.get(name, "k"), linestyle=style, label=f"{name} {lr:.2g}")
    finite = [v for v in prior.losses if math.isfinite(v)]
    if finite:
        lo = min(finite)
        ax.set_ylim(lo - 0.1 * abs(lo), min(max(finite), lo * 4 + 1))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title or f"LR finder: {prior.key}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
