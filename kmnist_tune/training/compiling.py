"""torch.compile that cannot cost a trial: the first compiled step of a worker is tried once per
(architecture, device, mode) on a synthetic batch; a compile error falls back to the plain module,
said once, and the decision is kept for the worker's later trials.

dynamo and inductor compile lazily, at a module's first call: without this check a missing C++
compiler (inductor's InvalidCxxCompiler on a CPU; Triton's "Failed to find C compiler" on CUDA)
raises inside fastai's fit and fails every trial of the worker.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import one_line
from .loader import to_channels_last


@dataclass(frozen=True)
class CompileOutcome:
    """How the compiled step went: `ok`, else the reason (the innermost exception, one line)."""

    ok: bool
    reason: str = ""
    seconds: float = 0.0
    note: str = ""  # what a compile that worked left out (mode="reduce-overhead": CUDA graphs skipped)
    # The compiled module (None when it fell back); not part of what is compared or shown.
    model: nn.Module | None = field(default=None, compare=False, repr=False)

    @property
    def record(self) -> str:
        """What a trial records as `compile`."""
        if not self.ok:
            return f"fell back: {self.reason}"
        return f"compiled ({self.note})" if self.note else "compiled"


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error (CUDA's own type, or another backend's RuntimeError): the batch-halving
    rule's business, never a reason to train uncompiled."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def root_cause(e: BaseException) -> str:
    """`Type: message` of the innermost exception: dynamo wraps inductor's (BackendCompilerFailed,
    InductorError), which wraps the one that says what is missing (InvalidCxxCompiler, a C compiler
    Triton did not find)."""
    seen = [e]
    while (nxt := seen[-1].__cause__ or seen[-1].__context__) is not None and nxt not in seen and len(seen) < 10:
        seen.append(nxt)
    inner = seen[-1]
    # dynamo's own advice (TORCHDYNAMO_VERBOSE, TORCH_LOGS) follows a blank line: not ours to pass on.
    text = str(inner).split("\n\n")[0]
    return f"{type(inner).__name__}: {one_line(Exception(text), 200)}"


def synthetic_batch(batch_shape: tuple[int, ...], device: torch.device, perf: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of `batch_shape` and its labels on `device`, in `perf`'s memory format (the strides
    the loader hands over)."""
    x = torch.randn(batch_shape, device=device)
    if perf.channels_last:
        x = to_channels_last(x)
    return x, torch.zeros(batch_shape[0], dtype=torch.long, device=device)


def synthetic_step(model: nn.Module, batch_shape: tuple[int, ...], device: torch.device, perf: Any) -> float:
    """One training forward and backward and one validation forward (no gradients) on a random batch
    of `batch_shape`, as a fit runs them: in `perf`'s memory format, under bf16 autocast when it asks
    for bf16. Leaves gradients and batch-norm statistics changed; returns the loss."""
    x, y = synthetic_batch(batch_shape, device, perf)
    was_training = model.training
    try:
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=perf.precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=perf.precision == "bf16"):
            model(x)
    finally:
        model.train(was_training)
    return float(loss.detach())


def try_compiled_step(model: nn.Module, batch_shape: tuple[int, ...], device: torch.device, perf: Any) -> CompileOutcome:
    """Compile a copy of `model` (on `device`, in `perf`'s memory format) and run `synthetic_step` on it.

    On success the outcome holds the compiled copy, its weights and buffers those of `model` and no
    gradients left; `model` itself is never changed. Any error of the compiled step but an
    out-of-memory one (raised: batch halving handles it) is a fallback: dynamo's and inductor's
    (BackendCompilerFailed, InductorError, InvalidCxxCompiler, a missing Triton or C compiler) and
    anything else the compiled code raised; a device that fails plainly fails again in the
    uncompiled step after it. `perf` is a precision.Performance."""
    t0 = time.perf_counter()
    _size_compile_pool()
    compiled = copy.deepcopy(model)
    # nn.Module.compile compiles the module in place (torch.compile would wrap it, and its state_dict
    # keys would change: checkpoints and exports read the module's own).
    compiled.compile(mode=None if perf.compile_mode == "default" else perf.compile_mode)
    x_shape = tuple(batch_shape)
    skips = _cudagraph_skips()
    try:
        # The batch dimension dynamic from the first compile: halving (32 -> 16 -> ...) then reuses
        # the graph instead of compiling one per size, each filling dynamo's cache (8 entries per
        # function, after which it runs eager without a word). Training batches are of one size
        # already (drop_last); marking beats padding validation, which would change its metric.
        _mark_batch_dynamic(compiled, x_shape)
        synthetic_step(compiled, x_shape, device, perf)
    except Exception as e:
        if is_oom(e):
            raise
        return CompileOutcome(False, root_cause(e), round(time.perf_counter() - t0, 2))
    compiled.load_state_dict(model.state_dict())  # the same tensors the compiled code holds
    for p in compiled.parameters():
        p.grad = None
    # mode="reduce-overhead" skips CUDA graphs for a graph that mutates its inputs (batch norm's running
    # statistics in training): inductor counts each skip (and logs why), the trial says so.
    skipped = _cudagraph_skips() - skips
    note = f"CUDA graphs skipped for {skipped} graph(s)" if skipped else ""
    return CompileOutcome(True, "", round(time.perf_counter() - t0, 2), note, compiled)


def _size_compile_pool() -> None:
    """Inductor's compile pool as large as this process's share of the cores (torch's threads follow
    it, recipe/cpu_threads.py), not one torch-importing process per core in every worker that compiles:
    four workers on 16 cores would start 64 while the others train. A share of 1 compiles in this
    process. TORCHINDUCTOR_COMPILE_THREADS, when a user sets it, decides instead."""
    if "TORCHINDUCTOR_COMPILE_THREADS" in os.environ:
        return
    import torch._inductor.config as inductor_config  # imported by the compile anyway; it takes seconds

    inductor_config.compile_threads = torch.get_num_threads()


def _mark_batch_dynamic(model: nn.Module, shape: tuple[int, ...]) -> None:
    """Mark dim 0 of the module's next input dynamic (a forward pre-hook that removes itself)."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        handle.remove()
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() and args[0].shape[0] > 1:
            torch._dynamo.mark_dynamic(args[0], 0)

    handle = model.register_forward_pre_hook(hook)


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def compiled_graphs() -> int:
    """Graphs dynamo compiled in this process so far: a trial's recompiles are the difference
    across its fit (torch._dynamo.utils.counters, which dynamo keeps whether or not it logs)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledModels:
    """A worker's compiled models and compile decisions, kept across its trials.

    Compiling resnet18 takes most of a minute, and a fresh module of the same architecture still
    recompiles (half of that, measured on a CPU; benchmarks/RESULTS.md). A trial of the same key
    (architecture, device, memory format, mode) gets the compiled module with its own fresh weights
    and buffers copied in, and no gradients left; another architecture replaces it. A key whose
    compiled step failed is not tried again: its later trials train uncompiled. `say` gets the one
    line of a fallback. One per worker (its Objective and its preflight): its attempts run one at a
    time and drop their Learner before the next is built, so nothing else holds the module."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.say = say
        self._key: tuple[Any, ...] | None = None
        self._model: nn.Module | None = None
        self.decisions: dict[tuple[Any, ...], CompileOutcome] = {}

    def get(self, key: tuple[Any, ...], fresh: nn.Module) -> nn.Module | None:
        if self._model is None or key != self._key:
            return None
        self._model.load_state_dict(fresh.state_dict())  # copied into the same tensors: compiled code holds
        for p in self._model.parameters():
            p.grad = None  # an attempt that died mid-step may have left some
            p.requires_grad_(True)
        return self._model

    def put(self, key: tuple[Any, ...], model: nn.Module) -> None:
        self._key, self._model = key, model

    def prepare(
        self, key: tuple[Any, ...], fresh: nn.Module, batch_shape: tuple[int, ...], device: torch.device, perf: Any, what: str
    ) -> tuple[nn.Module, CompileOutcome]:
        """`fresh` compiled (the kept module with its weights, or a new compile that was tried first),
        or `fresh` itself when this key fell back; and the decision. `what` names the model in the line."""
        decided = self.decisions.get(key)
        if decided is not None and not decided.ok:
            return fresh, decided
        if decided is not None and (kept := self.get(key, fresh)) is not None:
            return kept, decided
        outcome = try_compiled_step(fresh, batch_shape, device, perf)
        self.decisions[key] = CompileOutcome(outcome.ok, outcome.reason, outcome.seconds, outcome.note)  # without the module
        if not outcome.ok:
            if self.say is not None:
                self.say(f"compile: {what} on {device} failed ({outcome.reason}); training uncompiled")
            return fresh, self.decisions[key]
        if outcome.note and self.say is not None:
            self.say(f"compile: {what} on {device}: {outcome.note}")
        assert outcome.model is not None
        self.put(key, outcome.model)
        return outcome.model, self.decisions[key]
