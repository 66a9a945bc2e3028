"""W&B's distributions through their quantile function, as W&B's own random search draws them.

W&B samples a uniform u in [0, 1] and returns the distribution's inverse CDF at u, rounded to a
multiple of q for the q_ families (half to even, as numpy rounds). Optuna has no normal, beta or
W&B-style quantised distribution, so the sampler proposes u and this module turns it into the value
that training uses and that is stored as the trial's parameter (space.py).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .spec import ParamSpec

# The normal family has unbounded support; its quantile is taken in [EPS, 1 - EPS] (+-4.75 sigma),
# which keeps every value finite and gives Optuna a bounded range to store. Beta too, so that its
# ends (0 and 1, which W&B reaches only with probability 0) stay open for parameters like dropout.
QUANTILE_EPS = 1e-6


def ppf(p: ParamSpec, u: float) -> float:
    """The value at quantile u (0..1) of the block's distribution, rounded to q where it has one."""
    kind = p.kind()
    if kind in ("normal", "q_normal", "log_normal", "q_log_normal"):
        mu, sigma = p.shape
        z = NormalDist(mu, sigma).inv_cdf(min(max(u, QUANTILE_EPS), 1 - QUANTILE_EPS))
        x = math.exp(z) if "log" in kind else z
    elif kind in ("beta", "q_beta"):
        from scipy.special import betaincinv  # the regularised incomplete beta's inverse: beta's ppf

        a, b = p.shape
        x = float(betaincinv(a, b, min(max(u, QUANTILE_EPS), 1 - QUANTILE_EPS)))
    else:
        lo, hi = float(p.min), float(p.max)  # type: ignore[arg-type]
        if kind == "q_uniform":
            x = lo + u * (hi - lo)
        elif kind == "q_log_uniform_values":
            x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        elif kind == "q_log_uniform":
            x = math.exp(lo + u * (hi - lo))
        else:
            raise ValueError(f"{kind} is not sampled through its quantile")
    if kind.startswith("q_"):
        q = p.step
        x = round(x / q) * q
        return int(x) if isinstance(q, int) else x
    return x


def categorical_at(values: list[object], probabilities: list[float], u: float) -> object:
    """W&B's categorical with `probabilities`: the value whose share of [0, 1] holds u."""
    acc = 0.0
    for value, weight in zip(values, probabilities, strict=True):
        acc += weight
        if u < acc:
            return value
    return values[-1]
