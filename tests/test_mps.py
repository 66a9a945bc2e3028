"""`--per-gpu K > 1` and NVIDIA's MPS (service/mps.py): where the control daemon is not installed, as
here, the supervisor says in one line that the processes take turns; nothing to share, nothing said.
(Starting and stopping a daemon needs a GPU: tests/test_perf_gpu.py.)"""

from __future__ import annotations

import shutil

import pytest

from kmnist_tune.service import mps


def test_without_nvidias_mps_it_says_the_processes_take_turns(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without nvidia-cuda-mps-control, whatever is installed
    assert shutil.which(mps.CONTROL) is None
    said: list[str] = []
    assert mps.share_gpus([0, 1], 4, said.append) is None
    assert said == [f"--per-gpu 4: NVIDIA's MPS ({mps.CONTROL}) is not installed; the 4 processes on each GPU take turns"]


@pytest.mark.parametrize(("gpus", "per_gpu"), [([0, 1], 1), ([], 4)], ids=["one per GPU", "CPU slots"])
def test_nothing_to_share_nothing_said(gpus: list[int], per_gpu: int) -> None:
    said: list[str] = []
    assert mps.share_gpus(gpus, per_gpu, said.append) is None
    assert said == []
