"""W&B's distributions through their quantile function, as W&B's own random search draws them.

W&B samples a uniform u in [0, 1] and returns the distribution's inverse CDF at u, rounded to a
multiple of q for the q_ families (half to even, as numpy rounds). Optuna has no normal, beta or
W&B-style quantised distribution, so the sampler proposes u and this module turns it into the value
that training uses and that is stored as the trial's parameter (space.py).
"""

from __future__ import annotations

import math
from statistics import NormalDist

# The normal family has unbounded support; its quantile is taken in [EPS, 1 - EPS] (+-4.75 sigma),
# which keeps every value finite and gives Optuna a bounded range to store. Beta too, so that its
# ends (0 and 1, which W&B reaches only with probability 0) stay open for parameters like dropout.
QUANTILE_EPS = 1e-6


def ppf(
    kind: str,
    u: float,
    low: float = 0.0,
    high: float = 1.0,
    *,
    shape: tuple[float, float] = (0.0, 1.0),
    step: int | float = 1,
) -> float:
    """The value at quantile u (0..1) of W&B's distribution `kind`, rounded to a multiple of `step`
    for the q_ families (an int when `step` is one). `low`/`high` bound the uniform families (W&B's
    min/max), `shape` is (mu, sigma) of the normal family or (a, b) of beta. Plain numbers, so that
    the spec's models can call it without this module knowing them."""
    if kind in ("normal", "q_normal", "log_normal", "q_log_normal"):
        mu, sigma = shape
        z = NormalDist(mu, sigma).inv_cdf(min(max(u, QUANTILE_EPS), 1 - QUANTILE_EPS))
        x = math.exp(z) if "log" in kind else z
    elif kind in ("beta", "q_beta"):
        # The regularised incomplete beta's inverse is beta's ppf; neither the standard library nor
        # numpy has it.
        from scipy.special import betaincinv

        a, b = shape
        x = float(betaincinv(a, b, min(max(u, QUANTILE_EPS), 1 - QUANTILE_EPS)))
    elif kind == "q_uniform":
        x = low + u * (high - low)
    elif kind == "q_log_uniform_values":
        x = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    elif kind == "q_log_uniform":
        x = math.exp(low + u * (high - low))
    else:
        raise ValueError(f"{kind} is not sampled through its quantile")
    if kind.startswith("q_"):
        x = round(x / step) * step
        return int(x) if isinstance(step, int) else x
    return x


def categorical_at(values: list[object], probabilities: list[float], u: float) -> object:
    """W&B's categorical with `probabilities`: the value whose share of [0, 1] holds u."""
    acc = 0.0
    for value, weight in zip(values, probabilities, strict=True):
        acc += weight
        if u < acc:
            return value
    return values[-1]
