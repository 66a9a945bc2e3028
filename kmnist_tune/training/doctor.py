"""`kmnist-tune doctor`'s checks of what trains: torch and CUDA, every GPU, the compile, the data files.

GPUs: a host with none is a warning (CPU workers work), a GPU that torch cannot use or that fails
one uncompiled step is a failure. A compile that fails is a warning: a worker trains uncompiled, as
issue 35 has it fall back. The compile runs in a child process, so that a slow or stuck compile is
bounded and a crash in it is a reason, not the end of this command. torch is imported by the checks
that use it, so that the compile's child process starts (and imports it) while this one does.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..contract.checks import FAIL, OK, SKIP, WARN, Check
from ..errors import one_line
from . import data as kdata

GIB = 1 << 30
BUSY_SHARE = 0.10  # a GPU with more than this share of its memory taken by others: another job is on it
NVIDIA_SMI_S = 15.0


def python_check() -> Check:
    v = platform.python_version()
    status = OK if sys.version_info >= (3, 11) else FAIL
    return Check("python", status, f"{v} ({sys.executable})", {"version": v, "executable": sys.executable})


def nvidia_smi() -> tuple[list[dict[str, str]], str]:
    """nvidia-smi's GPUs (uuid, name, memory used and total in MiB, driver) and a note when it is
    absent or fails: it counts what other processes hold, which torch's own view cannot tell apart.
    Taken before this command's compile probe or checks touch a GPU, so that their memory is not counted."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], "nvidia-smi not found"
    fields = "uuid,name,memory.used,memory.total,driver_version"
    try:
        done = subprocess.run(
            [exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_S,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"nvidia-smi failed: {type(e).__name__}"
    if done.returncode != 0:
        return [], f"nvidia-smi failed: {one_line(Exception(done.stdout + done.stderr), 160)}"
    rows = [dict(zip(fields.split(","), (p.strip() for p in line.split(",")), strict=False)) for line in done.stdout.splitlines()]
    return [r for r in rows if r.get("uuid")], ""


def _cuda_reason() -> str:
    """Why torch has no CUDA: its own error from initialising it, or what its build lacks."""
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA; install a CUDA build"
    try:
        torch.cuda.init()
    except Exception as e:
        return one_line(e, 200)
    return "torch sees no CUDA device (CUDA_VISIBLE_DEVICES?)"


def torch_check() -> Check:
    import torch

    number = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    cudnn = _cudnn(number) if number else None
    detail = f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none (a CPU build)'}"
    detail += f", cuDNN {cudnn}" if cudnn else ""
    return Check("torch", OK, detail, {"version": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn})


def fastai_check() -> Check:
    """fastai's version, and whether the fast loop's overrides fit it (else trials use fastai's own loop)."""
    import importlib.metadata

    from .loop import fast_loop_problem

    version = importlib.metadata.version("fastai")
    problem = fast_loop_problem()
    if problem is None:
        return Check("fastai", OK, f"{version}: the fast loop's overrides fit it", {"version": version, "loop": "fast"})
    detail = f"{version}: {problem}; trials train with fastai's own loop (slower per batch)"
    return Check("fastai", WARN, detail, {"version": version, "loop": "fastai", "problem": problem})


def _cudnn(n: int) -> str:
    """cuDNN's version number as it is written: 92400 -> 9.24.0 (from 9 on: major*10000), 8902 -> 8.9.2."""
    major, rest = (n // 10000, n % 10000) if n >= 10000 else (n // 1000, n % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def gpu_checks(smi_before: tuple[list[dict[str, str]], str] | None = None) -> list[Check]:
    """The CUDA row (driver, how many GPUs), then one row per GPU torch sees. `smi_before`: nvidia_smi()
    taken before anything of this process touched a GPU."""
    import torch

    smi, smi_note = smi_before or nvidia_smi()
    driver = smi[0].get("driver_version") if smi else None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    data: dict[str, Any] = {"driver": driver, "available": torch.cuda.is_available(), "cuda_visible_devices": visible}
    if not torch.cuda.is_available():
        if smi and visible not in ("", "-1"):
            why = _cuda_reason()
            detail = f"nvidia-smi lists {len(smi)} GPU(s) (driver {driver}) but torch cannot use them: {why}"
            return [Check("cuda", FAIL, detail, data)]
        hidden = " (CUDA_VISIBLE_DEVICES hides them)" if smi else ""
        return [Check("cuda", WARN, f"no GPU{hidden}: workers train on the CPU", data)]
    count = torch.cuda.device_count()
    data["count"] = count
    rows = [Check("cuda", OK, f"CUDA {torch.version.cuda}, driver {driver or f'unknown ({smi_note})'}, {count} GPU(s)", data)]
    by_uuid = {r["uuid"].removeprefix("GPU-"): r for r in smi}
    for i in range(count):
        rows.append(_gpu_row(i, by_uuid))
    return rows


def _gpu_row(i: int, by_uuid: dict[str, dict[str, str]]) -> Check:
    import torch

    from .compile_probe import DeviceBroken, check_eager

    name = f"gpu {i}"
    try:
        p = torch.cuda.get_device_properties(i)
        smi = by_uuid.get(str(getattr(p, "uuid", "")).removeprefix("GPU-"))
        if smi is not None and smi.get("memory.used", "").isdigit():
            busy = int(smi["memory.used"]) * (1 << 20)  # other processes' use, before this one touches it
        else:
            free, total = torch.cuda.mem_get_info(i)  # includes this process's own context
            busy = total - free
        check_eager(torch.device("cuda", i))
    except DeviceBroken as e:
        return Check(name, FAIL, f"fails one uncompiled step: {e}; fix or reset this GPU, or leave it out of --gpus")
    except Exception as e:
        return Check(name, FAIL, f"cannot be used: {type(e).__name__}: {one_line(e, 200)}")
    bf16 = p.major >= 8  # bf16 in hardware from Ampere on (torch.cuda.is_bf16_supported asks the current device only)
    data = {
        "name": p.name,
        "memory_gib": round(p.total_memory / GIB, 1),
        "busy_gib": round(busy / GIB, 1),
        "capability": f"{p.major}.{p.minor}",
        "bf16": bf16,
    }
    detail = (
        f"{p.name}, {data['memory_gib']} GiB, compute capability {p.major}.{p.minor}, "
        f"bf16 {'yes' if bf16 else 'no (trains in fp32)'}, busy {data['busy_gib']} GiB"
    )
    if busy > BUSY_SHARE * p.total_memory:
        return Check(name, WARN, detail + ": another job holds its memory; trials there may run out of memory", data)
    return Check(name, OK, detail, data)


class CompileRun:
    """A real tiny compile in a child process (compile_probe.py), started at once so that it runs while
    the other checks do, and bounded: `check` waits at most `timeout_s` from the start. `auto`: the
    first GPU, where a worker compiles by default; on a CPU-only host the CPU (where only a spec's
    `performance: {compile: true}` compiles)."""

    def __init__(self, device: str = "auto", timeout_s: float = 300.0):
        self.device, self.timeout_s, self.t0 = device, timeout_s, time.monotonic()
        # -P: the working directory is not on the child's sys.path (a torch.py or kmnist_tune/ there is
        # data, never an import), as for a worker's slot processes (service/slots.py).
        cmd = [sys.executable, "-P", "-m", "kmnist_tune.training.compile_probe", device]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def check(self) -> Check:
        name, device = "compile", self.device
        left = max(0.0, self.timeout_s - (time.monotonic() - self.t0))
        try:
            stdout, stderr = self.proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            why = f"no answer from a tiny compile on {device} in {self.timeout_s:.0f} s"
            return Check(name, WARN, f"{why}{_fallback(device)}", {"device": device})
        try:
            result = json.loads((stdout.strip().splitlines() or [""])[-1])
        except json.JSONDecodeError:
            err = stderr.strip().splitlines()
            tail = one_line(Exception(err[-1] if err else f"exit status {self.proc.returncode}"), 200)
            return Check(name, WARN, f"the compile probe on {device} died: {tail}{_fallback(device)}", {"device": device})
        device = result.get("device", device)
        if not result.get("eager", True):
            return Check(name, FAIL, f"{device} fails an uncompiled step: {result['reason']}", result)
        secs = float(result.get("seconds", 0.0))
        if result.get("ok"):
            detail = f"works on {device}: a tiny conv+BN net compiled, forward and backward, in {secs:.1f} s"
            return Check(name, OK, detail, result)
        return Check(name, WARN, f"fails on {device}: {result.get('reason', '?')}{_fallback(device)}", result)


def _fallback(device: str) -> str:
    cpu = "" if device.startswith("cuda") else " (a CPU worker compiles only with performance: {compile: true})"
    return "; workers train uncompiled (slower)" + cpu


def compile_skipped() -> Check:
    return Check("compile", SKIP, "not probed (--no-compile)")


def data_check(dataset: str, data_dir: Path) -> Check:
    """The data set's files in the data folder: every present file must verify (md5: the official
    sums, or the folder's MD5SUMS); missing ones a worker downloads at its first trial."""
    name = f"data {dataset}"
    info = kdata.get_dataset(dataset)
    try:
        statuses = kdata.verify(dataset, data_dir)
    except kdata.DataError as e:
        return Check(name, FAIL, str(e), {"data_dir": str(data_dir)})
    files = {s.path.name: s.state for s in statuses}
    data = {"data_dir": str(data_dir), "files": files}
    bad = [s for s in statuses if s.state not in ("ok", "missing")]
    if bad:
        s = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return Check(name, FAIL, f"{kdata.file_problem(s)}{more}", data)
    complete = [fm for fm, splits in info.formats.items() if all(files.get(f.name) == "ok" for s in splits.values() for f in s)]
    if complete:
        sums = "MD5SUMS" if (data_dir / kdata.MD5SUMS_NAME).is_file() else "official md5s"
        n = sum(st == "ok" for st in files.values())
        return Check(name, OK, f"{n} files in {data_dir} match their {sums} ({', '.join(complete)})", data)
    try:
        mirror = kdata.resolve_mirror(None)
    except kdata.DataError as e:
        return Check(name, FAIL, f"not in {data_dir}, and no download possible: {e}", data)
    return Check(
        name,
        WARN,
        f"not (all) in {data_dir}: a worker downloads it from {mirror} at its first trial "
        f"(or now: `kmnist-tune data fetch --dataset {dataset}`)",
        data,
    )
