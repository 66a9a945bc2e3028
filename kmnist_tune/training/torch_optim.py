"""PyTorch's multi-tensor optimizers (fused kernels on CUDA, `foreach` on a CPU) behind fastai's
`OptimWrapper`, so that fastai's Learner, one-cycle schedule, LR finder and `save(with_opt=True)`
drive them as they drive fastai's own optimizers.

Why not fastai's `Optimizer`: it updates one parameter tensor at a time in Python, through five
small callbacks each (resnet18 has 62 tensors), which on a GPU is hundreds of kernel launches a
step. Why not a bare `OptimWrapper(opt=torch.optim.AdamW)`: it drops two of fastai's semantics
that trials rely on, kept here:

- **No weight decay on biases and norm layers** (fastai's `wd_bn_bias=False`): the Learner marks
  them `do_wd=False` in the optimizer's per-parameter `state`, which `OptimWrapper` keeps but never
  reads; here the first step reads it.
- **Decoupled weight decay** (fastai's `decouple_wd=True`): torch's SGD and RMSprop only know L2
  decay (added to the gradient). So for every kind the torch optimizer gets no decay, and fastai's
  `p *= 1 - lr*wd` runs here first, on the parameters that have a gradient, in one multi-tensor
  op: AdamW's own decay is the same product at the same place, and one torch group per fastai
  group keeps one kernel per step (a group for the exempt parameters would be a second).

Adam is fastai's AdamW: the decay above, then PyTorch's Adam with fastai's eps (1e-5). The numbers agree with fastai's
within float rounding (tests/test_torch_optim.py), not bit for bit: torch divides by the square
root of the bias correction where fastai takes the root of the corrected average.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from fastai.optimizer import OptimWrapper, detuplify_pg

# fastai's hyper-parameter names for each torch optimizer's keys. `kt_wd` is the decoupled decay
# this wrapper applies itself where torch has none.
_HP_MAPS = {
    "adam": {"betas__0": "mom", "betas__1": "sqr_mom", "kt_wd": "wd"},
    "sgd": {"momentum": "mom", "kt_wd": "wd"},
    "rmsprop": {"alpha": "sqr_mom", "momentum": "mom", "kt_wd": "wd"},
}
# fastai's defaults for what the trial does not set (fastai.optimizer.Adam / RMSProp).
_EPS = {"adam": 1e-5, "rmsprop": 1e-8}
KINDS = tuple(_HP_MAPS)


def _torch_class(kind: str) -> type[torch.optim.Optimizer]:
    return {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}[kind]


def _speed_flags(kind: str, params: Sequence[torch.Tensor]) -> dict[str, bool]:
    """fused=True where PyTorch has a fused kernel for the parameters' device, else foreach."""
    if kind in ("adam", "sgd") and params and all(p.is_cuda for p in params):
        return {"fused": True}
    return {"foreach": True}


class TorchOptimizer(OptimWrapper):
    """One of PyTorch's optimizers as fastai's Learner expects an optimizer (see the module's text)."""

    def __init__(self, params: Any, kind: str, lr: float, mom: float, sqr_mom: float = 0.99, wd: float = 0.0):
        if kind not in _HP_MAPS:
            raise ValueError(f"no PyTorch optimizer for {kind!r} (one of {', '.join(KINDS)})")
        groups = _groups(params)
        defaults: dict[str, Any] = {"lr": lr, "weight_decay": 0.0}  # decay: see step()
        if kind == "adam":
            defaults.update(betas=(mom, sqr_mom), eps=_EPS[kind])
        elif kind == "sgd":
            defaults.update(momentum=mom)
        else:
            defaults.update(alpha=sqr_mom, momentum=mom, eps=_EPS[kind])
        flat = [p for g in groups for p in g]
        opt = _torch_class(kind)([{"params": g, "kt_wd": float(wd)} for g in groups], **defaults, **_speed_flags(kind, flat))
        self.kind = kind
        self._decayed: list[list[torch.Tensor]] | None = None  # per group, once the Learner has marked them
        self._hypers: list[dict[str, Any]] | None = None
        super().__init__(opt=opt, hp_map=_HP_MAPS[kind])

    def decayed(self) -> list[list[torch.Tensor]]:
        """Per group, the parameters weight decay applies to: all but those the Learner marked
        `do_wd=False` (it marks them right after making the optimizer, before any step)."""
        if self._decayed is None:
            marks = self.state
            self._decayed = [[p for p in pg["params"] if marks.get(p, {}).get("do_wd", True)] for pg in self.opt.param_groups]
        return self._decayed

    # fastai's view of the groups: its hyper-parameter names (`hypers` is read three times a batch,
    # by the Recorder and the scheduler: kept, and made again only once something changed).
    @property
    def hypers(self) -> list[dict[str, Any]]:
        if self._hypers is None:
            self._hypers = [{self.fwd_map.get(k, k): v for k, v in detuplify_pg(pg).items()} for pg in self.opt.param_groups]
        return self._hypers

    def set_hyper(self, k: str, v: Any) -> None:
        if isinstance(v, float | int) and not isinstance(v, bool):  # what the one-cycle schedule sets each batch
            self._set_hyper(k, [v] * len(self.opt.param_groups))
        else:
            super().set_hyper(k, v)

    def _set_hyper(self, k: str, v: Sequence[Any]) -> None:
        key = self.bwd_map.get(k, k)
        name, _, index = key.partition("__")  # fastai's name for a tuple's item: betas__0
        for i, (pg, v_) in enumerate(zip(self.opt.param_groups, v, strict=True)):
            if index:  # fastai's set_item_pg, without its string split and range walk per call
                items = list(pg[name])
                items[int(index)] = v_
                pg[name] = tuple(items)
            else:
                pg[name] = v_
            if self._hypers is not None:
                self._hypers[i][k] = v_

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        # fastai's decoupled decay first (its `weight_decay` callback), on the parameters with a gradient.
        for pg, decayed in zip(self.opt.param_groups, self.decayed(), strict=True):
            if pg["kt_wd"] and pg["lr"]:
                ps = [p for p in decayed if p.grad is not None]
                if ps:
                    torch._foreach_mul_(ps, 1 - pg["lr"] * pg["kt_wd"])
        self.opt.step()

    # clear_state, zero_grad (set_to_none) and state_dict are OptimWrapper's own, forwarded to torch's.
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.opt.load_state_dict(sd)
        self._hypers = None


def _groups(params: Any) -> list[list[torch.Tensor]]:
    """fastai's splitter output (one list of parameters, or a list of groups) as groups."""
    items = list(params)
    if items and not isinstance(items[0], torch.Tensor):
        return [list(g) for g in items]
    return [items]
