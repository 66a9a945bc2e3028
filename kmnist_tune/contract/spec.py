"""The sweep spec's models: typed, validated settings.

Parameter blocks use the vocabulary of W&B sweep configs (`value`, `values`,
`distribution`, `min`, `max`, `q`). Reading a spec (YAML, size and nesting bounds, W&B's own
top-level keys) is contract/load.py's; this module only validates what it is handed.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, ClassVar, Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from ..errors import UserError
from .quantiles import ppf

DISTRIBUTIONS = (
    "constant",
    "categorical",
    "uniform",
    "log_uniform_values",
    "int_uniform",
    "q_uniform",
    "q_log_uniform_values",
    # W&B's log-uniform family over exponents: all log-uniform in value space, so Optuna samples them
    # natively (see ParamSpec.support).
    "log_uniform",
    "inv_log_uniform",
    "inv_log_uniform_values",
    # W&B's families that Optuna has no distribution for: sampled through their quantile (space.py).
    "q_log_uniform",
    "normal",
    "q_normal",
    "log_normal",
    "q_log_normal",
    "beta",
    "q_beta",
    "lr_finder",
)
LOG_UNIFORM = ("log_uniform_values", "log_uniform", "inv_log_uniform", "inv_log_uniform_values")
BOUNDED_BY_SHAPE = ("normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta")  # no min/max
# Sampled as W&B does: a uniform quantile in [0, 1] through the distribution's inverse CDF.
THROUGH_QUANTILE = ("q_uniform", "q_log_uniform_values", "q_log_uniform", *BOUNDED_BY_SHAPE)
LRSuggestion = Literal["minimum", "valley", "steep"]
HalveOn = Literal["divergence", "oom"]
HALVE_ON: tuple[str, ...] = get_args(HalveOn)
SAMPLERS = ("tpe", "random", "grid")
# Known, and read in studies that already use it, but never built (service/studies.py, UNSAFE_SAMPLERS):
# Optuna keeps CMA-ES's state as a pickle in the study database.
REFUSED_SAMPLERS = ("cmaes",)
LR_FIND_ITERATIONS = 100  # fastai's lr_find default (num_it)
PRUNERS = ("median", "hyperband", "successive_halving", "none")
# The one list of each: the model builder, the metric code and the validation all read these.
Arch = Literal["resnet18", "resnet34", "resnet50"]
Stem = Literal["imagenet", "small"]
Metric = Literal["accuracy", "balanced_accuracy", "valid_loss"]
Direction = Literal["maximize", "minimize"]
Optimizer = Literal["adam", "sgd", "rmsprop", "lamb", "ranger"]  # fastai's (training/optim.py)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
ARCHS: tuple[str, ...] = get_args(Arch)
STEMS: tuple[str, ...] = get_args(Stem)
METRICS: tuple[str, ...] = get_args(Metric)


def default_metric(dataset: str) -> str:
    """K49 is imbalanced: balanced accuracy; KMNIST: plain accuracy."""
    return "balanced_accuracy" if dataset == "k49" else "accuracy"


def natural_direction(metric: str) -> str:
    return "minimize" if metric == "valid_loss" else "maximize"


class SpecError(UserError):
    """A sweep spec that does not validate; the message names the field."""


# Sampler and pruner options reach Optuna's constructors in every worker, from a spec anyone sharing the
# database can write: each value is bounded, so that one number cannot make every worker allocate or loop
# without end. The named ones are the options whose size is work; any other number gets the general bound.
MAX_OPTION_NUMBER = 1_000_000
OPTION_RANGES: dict[str, tuple[int, int, str]] = {
    "n_ei_candidates": (1, 10_000, "TPE scores that many candidates per parameter per trial"),
    "popsize": (2, 10_000, "CMA-ES samples and keeps a population that large per generation"),
    "reduction_factor": (2, 100, "successive halving raises it to a power per rung"),
    "min_early_stopping_rate": (0, 100, "successive halving's first rung is reduction_factor to this power"),
    "seed": (0, 2**32 - 1, "numpy's seed range"),
    "n_startup_trials": (0, MAX_OPTION_NUMBER, "trials before the sampler or pruner starts"),
    "n_warmup_steps": (0, MAX_OPTION_NUMBER, "epochs before pruning"),
    "interval_steps": (1, MAX_OPTION_NUMBER, "epochs between pruning checks"),
    "n_min_trials": (1, MAX_OPTION_NUMBER, "trials reporting a step before it is pruned"),
    "min_resource": (1, MAX_OPTION_NUMBER, "epochs"),
    "max_resource": (1, MAX_OPTION_NUMBER, "epochs"),
    "bootstrap_count": (0, MAX_OPTION_NUMBER, "trials per rung"),
}
# A name a W&B run logs under: printable text without control characters, as W&B's own keys.
WANDB_NAME = r"^[^\x00-\x1f\x7f]{1,128}$"
MAX_OPTIONS = 32  # Optuna's samplers take at most 14 keyword options
MAX_OPTION_ITEMS = 100  # a list or mapping value (CMA-ES's x0: one entry per parameter)
MAX_OPTION_TEXT = 100  # a string value ("auto", a strategy name) or key


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored. NaN and infinity are no numbers.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # YAML's true/false are not 1/0: `n_trials: true` is a mistake, not one trial.
        if isinstance(v, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is not Any and not _admits_bool(annotation):
                raise ValueError(f"{str(v).lower()} is a boolean; give a number")
        return v


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type accepts a boolean (bool itself, a Literal of True/False, a union holding one)."""
    if annotation is bool:
        return True
    return any(a is bool or a is True or a is False or _admits_bool(a) for a in get_args(annotation))


# Every hyperparameter a spec may set or search, with its default and its check.
# `kind` drives both validation of the YAML and how it is sampled.
PARAMETERS: dict[str, dict[str, Any]] = {
    "lr": {"kind": "float", "default": 1e-3, "min": 0.0, "min_open": True},
    "weight_decay": {"kind": "float", "default": 0.01, "min": 0.0},
    "batch_size": {"kind": "int", "default": 512, "min": 1},
    "epochs": {"kind": "int", "default": 10, "min": 1, "max": 1000},
    "pct_start": {"kind": "float", "default": 0.25, "min": 0.0, "max": 1.0, "min_open": True, "max_open": True},
    "dropout": {"kind": "float", "default": 0.5, "min": 0.0, "max": 1.0, "max_open": True},
    "arch": {"kind": "choice", "default": "resnet18", "choices": ARCHS},
    "stem": {"kind": "choice", "default": "imagenet", "choices": STEMS},
    # The knobs image-classifier sweeps tune, each a fastai part (training/optim.py). The defaults
    # are fastai's: Adam, one-cycle momentum 0.95 (-> 0.85 -> 0.95), sqr_mom 0.99, no smoothing, no mixing.
    "optimizer": {"kind": "choice", "default": "adam", "choices": OPTIMIZERS},
    "momentum": {"kind": "float", "default": 0.95, "min": 0.0, "max": 1.0, "max_open": True},
    "beta2": {"kind": "float", "default": 0.99, "min": 0.0, "max": 1.0, "max_open": True},
    "label_smoothing": {"kind": "float", "default": 0.0, "min": 0.0, "max": 1.0, "max_open": True},
    "mixup": {"kind": "float", "default": 0.0, "min": 0.0, "max": 100.0},  # MixUp's alpha; 0 = off
    "cutmix": {"kind": "float", "default": 0.0, "min": 0.0, "max": 100.0},  # CutMix's alpha; 0 = off
    "one_cycle": {"kind": "bool", "default": True},  # false: a flat fit at lr
}

# Parameter names as W&B users write them -> this project's parameters. Any spec may use them
# (wandb.translate renames them); here, so that an unknown name's error can list them too.
ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "wd": "weight_decay",
    "bs": "batch_size",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "max_epochs": "epochs",
    "drop": "dropout",
    "ps": "dropout",
    "architecture": "arch",
    "model": "arch",
    "optim": "optimizer",
    "opt": "optimizer",
    "beta1": "momentum",
    "beta_1": "momentum",
    "mom": "momentum",
    "beta_2": "beta2",
    "sqr_mom": "beta2",
    "smoothing": "label_smoothing",
    "label_smooth": "label_smoothing",
    "mixup_alpha": "mixup",
    "cutmix_alpha": "cutmix",
    "onecycle": "one_cycle",
    "warmup": "pct_start",
    "warmup_ratio": "pct_start",
    "warmup_pct": "pct_start",
}


class FinderSettings(NamedTuple):
    """What an lr_finder block asks of the LR finder, its defaults filled in."""

    width: float  # decades the search range spans, centred on the suggestion
    suggestion: str  # which of fastai's suggestions is the centre
    iterations: int  # the finder's steps (one batch each): fastai's num_it


class ParamSpec(_Strict):
    value: Any = None
    values: list[Any] | None = None
    distribution: str | None = None
    # int | float, not float: pydantic would turn `min: 16` into 16.0 and lose the int/float
    # distinction that W&B's shorthand (min/max without `distribution`) is inferred from.
    min: int | float | None = None
    max: int | float | None = None
    q: int | float | None = None
    # W&B's normal / log_normal (mu, sigma) and beta (a, b) shapes, with W&B's defaults.
    mu: float | None = None
    sigma: float | None = Field(default=None, gt=0)
    a: float | None = Field(default=None, gt=0)
    b: float | None = Field(default=None, gt=0)
    probabilities: list[float] | None = None  # categorical: W&B's weights of `values`
    # distribution: lr_finder -- the range is centred on fastai's LR-finder suggestion.
    width: float | None = Field(default=None, gt=0, le=8, description="decades around the suggestion")
    suggestion: LRSuggestion | None = None
    iterations: int | None = Field(
        default=None, ge=10, le=10_000, description=f"steps of fastai's lr_find (its num_it; default {LR_FIND_ITERATIONS})"
    )

    @field_validator("distribution")
    @classmethod
    def _known_distribution(cls, v: str | None) -> str | None:
        if v is not None and v not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {v!r}; use one of {', '.join(DISTRIBUTIONS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        dist = self.kind()
        finder_keys = [k for k in ("width", "suggestion", "iterations") if getattr(self, k) is not None]
        if finder_keys and dist != "lr_finder":
            raise ValueError(f"{', '.join(finder_keys)}: only for distribution lr_finder, not {dist}")
        if dist == "constant":
            if self.values is not None or self.min is not None or self.max is not None:
                raise ValueError("a fixed `value` takes no `values`, `min` or `max`")
            if self.value is None:
                raise ValueError("give `value`, `values`, or a `distribution` with `min` and `max`")
        elif dist == "categorical":
            if not self.values:
                raise ValueError("`values` must be a non-empty list")
            if self.probabilities is not None:
                probs = self.probabilities
                if len(probs) != len(self.values) or any(x < 0 for x in probs) or abs(sum(probs) - 1) > 1e-6:
                    raise ValueError("`probabilities` needs one weight >= 0 per value, summing to 1")
        elif dist in BOUNDED_BY_SHAPE:
            if self.min is not None or self.max is not None or self.values is not None:
                shaped_by = "a and b" if "beta" in dist else "mu and sigma"
                raise ValueError(f"distribution {dist} is shaped by {shaped_by}, not min/max")
            if dist.startswith("q_") and (isinstance(self.q, bool) or (self.q is not None and self.q <= 0)):
                raise ValueError(f"distribution {dist} needs a positive `q`")
        elif dist == "lr_finder":
            if self.min is not None or self.max is not None or self.values is not None:
                raise ValueError("lr_finder sets the range itself; give `width` (decades) and `suggestion`, not min/max")
            self.width, self.suggestion, self.iterations = self.lr_finder_settings()  # stored specs say what was used
        else:
            if self.min is None or self.max is None:
                raise ValueError(f"distribution {dist} needs `min` and `max`")
            if self.min > self.max:
                raise ValueError(f"min ({self.min:g}) is greater than max ({self.max:g})")
            if dist in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values") and self.min <= 0:
                raise ValueError(f"distribution {dist} needs min > 0 (got {self.min:g})")
            if dist.startswith("q_") and (isinstance(self.q, bool) or (self.q is not None and self.q <= 0)):
                raise ValueError(f"distribution {dist} needs a positive `q`")  # none given: W&B's q = 1
            if dist == "q_log_uniform_values" and math.ceil(self.min / self.step - 1e-9) * self.step > self.max + 1e-9:
                # Values are rounded to multiples of q; with none inside [min, max] every one would fall outside.
                raise ValueError(f"no multiple of q ({self.step:g}) lies between min ({self.min:g}) and max ({self.max:g})")
            if dist == "int_uniform" and not (float(self.min).is_integer() and float(self.max).is_integer()):
                raise ValueError("int_uniform needs whole-number min and max")
        return self

    def kind(self) -> str:
        """The distribution this block describes, with W&B's shorthands resolved."""
        if (self.width is not None or self.suggestion is not None or self.iterations is not None) and self.distribution is None:
            return "lr_finder"
        if self.distribution is not None:
            return self.distribution
        if self.values is not None:
            return "categorical"
        if self.min is not None or self.max is not None:
            # W&B infers int_uniform / uniform from the type of min and max: `min: 0.0, max: 1.0`
            # is a float range, not the two integers 0 and 1.
            both_int = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.min, self.max))
            return "int_uniform" if both_int else "uniform"
        return "constant"

    @property
    def step(self) -> int | float:
        """q of a q_ distribution; W&B's default is 1."""
        return self.q if self.q is not None else 1

    @property
    def shape(self) -> tuple[float, float]:
        """(mu, sigma) of the normal family, (a, b) of beta, W&B's defaults filled in."""
        if "beta" in self.kind():
            return float(self.a if self.a is not None else 1.0), float(self.b if self.b is not None else 1.0)
        return float(self.mu if self.mu is not None else 0.0), float(self.sigma if self.sigma is not None else 1.0)

    def support(self) -> tuple[float, float]:
        """The [low, high] of the values a distribution yields (its min/max are exponents for W&B's
        log_uniform, -exponents for inv_log_uniform: X = exp(U) and X = exp(-U)); the normal family's
        ends are its quantiles at QUANTILE_EPS and 1 - QUANTILE_EPS, after rounding to q."""
        if self.kind() in THROUGH_QUANTILE:
            return self.at_quantile(0.0), self.at_quantile(1.0)
        lo, hi = float(self.min), float(self.max)  # type: ignore[arg-type]
        if self.kind() == "log_uniform":
            return math.exp(lo), math.exp(hi)
        if self.kind() == "inv_log_uniform":
            return math.exp(-hi), math.exp(-lo)
        return lo, hi

    def at_quantile(self, u: float) -> float:
        """The value at quantile u (0..1) of a distribution drawn through its quantile (THROUGH_QUANTILE),
        rounded to q where it has one."""
        bounds = (float(self.min), float(self.max)) if self.min is not None and self.max is not None else (0.0, 1.0)
        return ppf(self.kind(), u, *bounds, shape=self.shape, step=self.step)

    def lr_finder_settings(self) -> FinderSettings:
        """Width, suggestion and iterations of an lr_finder block, with their defaults filled in."""
        if self.kind() != "lr_finder":
            raise ValueError(f"not an lr_finder block: {self.kind()}")
        return FinderSettings(
            float(self.width if self.width is not None else 2.0),
            self.suggestion or "minimum",
            self.iterations if self.iterations is not None else LR_FIND_ITERATIONS,
        )

    @property
    def searched(self) -> bool:
        return self.kind() != "constant" and not (self.kind() == "categorical" and len(self.values or []) == 1)


class DataSpec(_Strict):
    dataset: Literal["kmnist", "k49"] = "kmnist"
    format: Literal["npz", "idx"] | None = None
    train_size: int | None = Field(default=None, gt=0)
    valid_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    valid_size: int | None = Field(default=None, gt=0)
    split_seed: int = 0


class HalvingSpec(_Strict):
    """The batch-halving guard (see halving.py); thresholds are documented in the README."""

    min_batch_size: int = Field(default=16, ge=1)
    halve_on: list[HalveOn] = Field(default_factory=lambda: list(HALVE_ON))
    warmup_batches: int = Field(default=10, ge=1, description="batches before the smoothed-loss checks start")
    blowup_factor: float = Field(default=4.0, gt=1.0, description="smoothed loss above this x its running minimum")
    trend_drop: float = Field(default=0.05, ge=0.0, lt=1.0, description="least fractional drop over the first epoch")


class CheckpointSpec(_Strict):
    """Checkpoints after epochs, which a retried trial (stale, killed, handed back) resumes from."""

    enabled: Literal["auto", True, False] = Field(default="auto", description="auto: when a trial has more than 2 epochs")
    every: int = Field(default=1, ge=1, description="save after every N epochs")
    keep: int = Field(default=1, ge=1, description="checkpoints kept per trial (the newest)")
    # A 140 MB checkpoint after every 2-second epoch costs a fifth to a third of the epoch on an H200
    # (benchmarks/RESULTS.md); spaced in time, a kill loses at most this much work.
    min_interval_s: float = Field(
        default=30.0, ge=0.0, description="least seconds of training between two checkpoints (0: after every N epochs)"
    )

    def on_for(self, n_epochs: int) -> bool:
        return n_epochs > 2 if self.enabled == "auto" else bool(self.enabled)


class AugmentSpec(_Strict):
    """Random affine augmentation of training batches, on the device (see augment.py). Off by default."""

    enabled: bool = False
    max_shift: float = Field(default=0.1, ge=0.0, le=0.5, description="largest shift, as a fraction of the image side")
    max_rotate: float = Field(default=10.0, ge=0.0, le=180.0, description="largest rotation, degrees either way")
    max_scale: float = Field(default=0.1, ge=0.0, lt=1.0, description="scale drawn from 1 +- max_scale")


class PerformanceSpec(_Strict):
    """How a trial uses its device. `auto` means the fast choice on CUDA and plain fp32 on a CPU."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: Literal["auto", True, False] = "auto"
    cudnn_benchmark: bool = True
    deterministic: bool = Field(
        default=False,
        description="CUDA: PyTorch's deterministic algorithms (no cuDNN autotuner), so a seeded study repeats "
        "on the GPU too, at a cost in speed; a CPU's arithmetic is repeatable without it",
    )
    compile: Literal["auto", True, False] = Field(
        default="auto", description="torch.compile the model: auto = on CUDA (compiled once per worker), off on a CPU"
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        default="default", description="torch.compile's mode (reduce-overhead: CUDA graphs)"
    )
    loop: Literal["fast", "fastai"] = Field(
        default="fast",
        description="fast: fastai's Learner and Recorder with less host time a batch (training/loop.py), falling back "
        "to fastai's own with one line on a fastai it was not checked against; fastai: fastai's own loop and metrics",
    )
    optimizer: Literal["torch", "fastai"] = Field(
        default="torch",
        description="torch: PyTorch's fused (CUDA) or foreach (CPU) Adam/SGD behind fastai's OptimWrapper; fastai: its own",
    )


class WorkersSpec(_Strict):
    """How workers share the study; stored with it, so every worker on every host agrees."""

    heartbeat_interval: int = Field(default=30, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: int = Field(
        default=120, ge=1, description="silence after which a trial is failed (default 4 x heartbeat_interval)"
    )
    max_retry: int = Field(default=3, ge=0, description="times a trial of a dead or stopped worker is retried")
    max_consecutive_failures: int = Field(
        default=3, ge=1, le=1000, description="a worker stops after this many failed trials in a row (W&B's agent: 3)"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_grace(cls, data: Any) -> Any:
        # The default follows the interval: four missed beats.
        if isinstance(data, dict) and data.get("grace_period") is None:
            beat = data.get("heartbeat_interval", 30)
            if isinstance(beat, int) and not isinstance(beat, bool):
                data = {**data, "grace_period": 4 * beat}
        return data

    @model_validator(mode="after")
    def _grace(self) -> WorkersSpec:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"grace_period ({self.grace_period}) must exceed heartbeat_interval ({self.heartbeat_interval})")
        return self


class WandbSpec(_Strict):
    """One W&B run per trial, grouped by study. auto = online when logged in, else offline."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str | None = None  # default: the study name
    entity: str | None = None
    dir: str | None = None  # where W&B writes (./wandb by default); offline runs wait there for `wandb sync`
    # The sweep file's own names (contract/wandb.py keeps them): a trial's run logs the metric and its
    # config under them, so the user's panels and filters find what the file named.
    metric_name: str | None = Field(default=None, pattern=WANDB_NAME)
    param_names: dict[str, str] | None = None  # this project's parameter -> the file's name for it

    @field_validator("param_names")
    @classmethod
    def _known_params(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for ours, theirs in (v or {}).items():
            if ours not in PARAMETERS:
                raise ValueError(f"{ours!r} is not a parameter of this project")
            if not isinstance(theirs, str) or not re.fullmatch(WANDB_NAME, theirs):
                raise ValueError(f"{theirs!r} is not a usable W&B name (printable, at most 128 characters)")
        return v


class TrackingSpec(_Strict):
    wandb: WandbSpec = Field(default_factory=WandbSpec)


class _NamedChoice(_Strict):
    """`{name: ..., options: {...}}`: an Optuna sampler or pruner picked by name, with its keyword options."""

    KIND: ClassVar[str]
    CHOICES: ClassVar[tuple[str, ...]]
    READABLE: ClassVar[tuple[str, ...]] = ()  # names still parsed (old studies) but not offered
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in cls.CHOICES and v not in cls.READABLE:
            raise ValueError(f"unknown {cls.KIND} {v!r}{did_you_mean(v, cls.CHOICES)}; use one of {', '.join(cls.CHOICES)}")
        return v

    @field_validator("options")
    @classmethod
    def _bounded(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) > MAX_OPTIONS:
            raise ValueError(f"{len(v)} options; an Optuna {cls.KIND} takes at most {MAX_OPTIONS}")
        for key, value in v.items():
            problem = _option_problem(key, value)
            if problem:
                raise ValueError(problem)
        return v


def _option_problem(name: str, value: Any, nested: bool = False) -> str | None:
    """What is out of bounds in one sampler/pruner option (None: nothing); `nested`: inside a list or mapping."""
    if len(name) > MAX_OPTION_TEXT:
        return f"option name {name[:20]!r}... is longer than {MAX_OPTION_TEXT} characters"
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name}: {non_finite(value)} is not a usable number; give a finite value"
        lo, hi, why = _ANY_NUMBER if nested else OPTION_RANGES.get(name, _ANY_NUMBER)
        if not lo <= value <= hi:
            because = f" ({why})" if why else ""
            return f"{name}: {value!r} is outside {lo}..{hi}{because}; give a value in that range"
        return None
    if isinstance(value, str):
        if len(value) > MAX_OPTION_TEXT:
            return f"{name}: a string of {len(value)} characters; an option's text is at most {MAX_OPTION_TEXT}"
        return None
    if isinstance(value, list | dict):
        if nested:
            return f"{name}: a list or mapping inside another; give a value, or a list or mapping of values"
        if len(value) > MAX_OPTION_ITEMS:
            return f"{name}: {len(value)} entries; an option holds at most {MAX_OPTION_ITEMS}"
        for key, item in value.items() if isinstance(value, dict) else ((name, item) for item in value):
            if not isinstance(key, str):
                return f"{name}: key {key!r} is not a name"
            problem = _option_problem(key, item, nested=True)
            if problem:
                return f"{name}.{problem}" if isinstance(value, dict) else problem
        return None
    return f"{name}: a {type(value).__name__} is not an option value; give a number, a string, true/false, a list or a mapping"


_ANY_NUMBER = (-MAX_OPTION_NUMBER, MAX_OPTION_NUMBER, "")


class SamplerSpec(_NamedChoice):
    KIND, CHOICES = "sampler", SAMPLERS
    READABLE: ClassVar[tuple[str, ...]] = REFUSED_SAMPLERS
    name: str = "tpe"


class PrunerSpec(_NamedChoice):
    KIND, CHOICES = "pruner", PRUNERS
    name: str = "median"


class BudgetSpec(_Strict):
    """n_trials and/or a timeout; neither (`budget: {}`, a W&B sweep without run_cap) runs until stopped."""

    n_trials: int | None = Field(default=None, gt=0)
    timeout: float | None = Field(default=None, gt=0, description="seconds, per `run`/`worker` process")


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    description: str = ""
    # Filled from the data set (metric) and the metric (direction) when the spec leaves them out.
    metric: Metric = "accuracy"
    direction: Direction = "maximize"
    data: DataSpec = Field(default_factory=DataSpec)
    parameters: dict[str, ParamSpec] = Field(default_factory=dict)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    halving: HalvingSpec = Field(default_factory=HalvingSpec)
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    checkpoints: CheckpointSpec = Field(default_factory=CheckpointSpec)
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec)
    budget: BudgetSpec
    # W&B's metric.target: the study stops (as `study stop` does) once a finished trial reaches it.
    target: float | None = None
    seed: int = Field(default=0, ge=0, le=2**32 - 1)  # numpy's seed range (the sampler's and the splits')
    _notes: list[str] = PrivateAttr(default_factory=list)  # what reading a W&B sweep file left unused

    @property
    def notes(self) -> list[str]:
        return list(self._notes)

    def add_notes(self, notes: list[str]) -> None:
        """Say what reading the file left unused (contract/load.py); the commands print it."""
        self._notes.extend(notes)

    @model_validator(mode="before")
    @classmethod
    def _fill_metric(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        d = data.get("data")
        dataset = d.get("dataset", "kmnist") if isinstance(d, dict) else "kmnist"
        if data.get("metric") is None:
            data = {**data, "metric": default_metric(dataset)}
        if data.get("direction") is None and data["metric"] in METRICS:
            data = {**data, "direction": natural_direction(data["metric"])}
        return data

    @model_validator(mode="before")
    @classmethod
    def _batch_size_block(cls, data: Any) -> Any:
        """`batch_size: {initial: 512, min: 16, halve_on: [...]}` (or `values: [...]` with `min`) is the
        issue's short form: the start value stays a parameter, `min`/`halve_on` go to `halving:`."""
        if not isinstance(data, dict) or not isinstance(data.get("parameters"), dict):
            return data
        bs = data["parameters"].get("batch_size")
        if not isinstance(bs, dict) or not ({"initial", "halve_on"} & bs.keys() or ("values" in bs and "min" in bs)):
            return data
        bs = dict(bs)
        halving = dict(data.get("halving") or {})
        for key, target in (("min", "min_batch_size"), ("halve_on", "halve_on")):
            if key in bs:
                value = bs.pop(key)
                if target in halving and halving[target] != value:
                    raise ValueError(f"parameters.batch_size.{key} ({value}) contradicts halving.{target} ({halving[target]})")
                halving[target] = value
        if "initial" in bs:
            bs["value"] = bs.pop("initial")
        return {**data, "parameters": {**data["parameters"], "batch_size": bs}, "halving": halving}

    @field_validator("sampler", "pruner", mode="before")
    @classmethod
    def _name_shorthand(cls, v: Any) -> Any:
        # `sampler: random` is shorthand for `sampler: {name: random}`.
        return {"name": v} if isinstance(v, str) else v

    @field_validator("parameters", mode="before")
    @classmethod
    def _bare_values(cls, v: Any) -> Any:
        # `epochs: 2` is shorthand for `epochs: {value: 2}`.
        if isinstance(v, dict):
            return {k: (p if isinstance(p, dict) else {"value": p}) for k, p in v.items()}
        return v

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        natural = natural_direction(self.metric)
        if self.direction != natural:
            raise ValueError(f"direction {self.direction} contradicts metric {self.metric} (which is to {natural})")
        if self.target is not None and self.metric != "valid_loss" and not 0 < self.target <= 1:
            raise ValueError(f"target: {self.target:g} is never reached by {self.metric} (0..1); give a fraction such as 0.99")
        for name, p in self.parameters.items():
            _check_parameter(name, p)
        for name, p in self.parameters.items():
            if p.kind() == "lr_finder" and name != "lr":
                raise ValueError(f"parameters.{name}: distribution lr_finder is only for lr")
        bs = self.parameters.get("batch_size")
        starts = [] if bs is None else [bs.value] if bs.kind() == "constant" else list(bs.values or [])
        starts = [b for b in starts if isinstance(b, int) and not isinstance(b, bool)]
        if starts and min(starts) < self.halving.min_batch_size and "min_batch_size" not in self.halving.model_fields_set:
            # A W&B user's `batch_size: {values: [8, 16, 32]}`: the smallest start is the floor.
            self.halving.min_batch_size = min(starts)
        for b in starts:
            if b < self.halving.min_batch_size:
                raise ValueError(f"parameters.batch_size: {b} is below halving.min_batch_size ({self.halving.min_batch_size})")
        can_mix = [name for name in ("mixup", "cutmix") if name in self.parameters and _can_be_on(self.parameters[name])]
        if len(can_mix) == 2:
            raise ValueError(
                "parameters.mixup and parameters.cutmix: a trial mixes its batches one way (fastai's MixUp or CutMix); "
                "search one of them and fix the other at 0"
            )
        if self.sampler.name == "grid":
            for name, p in self.parameters.items():
                if p.searched and p.kind() != "categorical":
                    raise ValueError(f"sampler grid needs every searched parameter as `values`; parameters.{name} is {p.kind()}")
        return self

    # -- resolved views ------------------------------------------------------
    def fixed_params(self) -> dict[str, Any]:
        """Defaults overlaid with every parameter the spec pins to one value."""
        out = {k: meta["default"] for k, meta in PARAMETERS.items()}
        for name, p in self.parameters.items():
            if not p.searched:
                out[name] = p.value if p.kind() == "constant" else p.values[0]  # type: ignore[index]
        return out

    def reaches_target(self, value: float | None) -> bool:
        """Whether a finished trial's value reaches the spec's target (metric.target)."""
        if self.target is None or value is None:
            return False
        return value >= self.target if self.direction == "maximize" else value <= self.target

    def searched_params(self) -> dict[str, ParamSpec]:
        return {k: p for k, p in self.parameters.items() if p.searched}

    @property
    def lr_finder(self) -> ParamSpec | None:
        """The `lr` block when it asks for the LR-finder prior, else None."""
        p = self.parameters.get("lr")
        return p if p is not None and p.kind() == "lr_finder" else None

    def with_budget(self, n_trials: int | None = None, timeout: float | None = None) -> SweepSpec:
        """This spec with the budget's n_trials and/or timeout replaced (None: keep the spec's)."""
        update = {k: v for k, v in (("n_trials", n_trials), ("timeout", timeout)) if v is not None}
        return self.model_copy(update={"budget": self.budget.model_copy(update=update)}) if update else self

    def with_lr_range(self, low: float, high: float) -> SweepSpec:
        """This spec with `lr` searched log-uniformly over [low, high]: an LR-finder spec resolved by
        its prior (in memory only; the stored spec keeps saying lr_finder)."""
        lr = ParamSpec(distribution="log_uniform_values", min=low, max=high)
        return self.model_copy(update={"parameters": {**self.parameters, "lr": lr}})


def _can_be_on(p: ParamSpec) -> bool:
    """Whether a 0-means-off parameter (mixup, cutmix) can take a value above 0."""
    kind = p.kind()
    if kind == "constant":
        return bool(p.value)
    if kind == "categorical":
        return any(bool(v) for v in p.values or [])
    return p.support()[1] > 0


def _check_parameter(name: str, p: ParamSpec) -> None:
    if name not in PARAMETERS:
        known = [*PARAMETERS, *ALIASES]
        raise ValueError(f"parameters.{name}: unknown parameter{did_you_mean(name, known)}; known: {', '.join(known)}")
    meta = PARAMETERS[name]
    kind = p.kind()
    where = f"parameters.{name}"
    if meta["kind"] == "choice" and kind not in ("constant", "categorical"):
        raise ValueError(f"{where}: {name} is a choice; give `value` or `values` from {', '.join(meta['choices'])}")
    if meta["kind"] == "bool" and kind not in ("constant", "categorical"):
        raise ValueError(f"{where}: {name} is true or false; give `value` or `values: [true, false]`")
    if meta["kind"] == "int" and kind in ("uniform", *LOG_UNIFORM, "normal", "log_normal", "beta"):
        raise ValueError(f"{where}: {name} is a whole number; use int_uniform, q_uniform, q_log_uniform_values or values")
    if meta["kind"] == "int" and kind.startswith("q_") and not float(p.step).is_integer():
        # A step of 0.5 over whole numbers would silently become a step of 1.
        raise ValueError(f"{where}: {name} is a whole number; q must be a whole number too (got {p.step:g})")
    candidates: list[Any] = []
    if kind == "constant":
        candidates = [p.value]
    elif kind == "categorical":
        candidates = list(p.values or [])
    elif kind == "lr_finder":
        candidates = []
    else:
        candidates = list(p.support())
    for c in candidates:
        problem = _value_problem(meta, c)
        if problem:
            raise ValueError(f"{where}: {problem}")


def _value_problem(meta: dict[str, Any], v: Any) -> str | None:
    if meta["kind"] == "choice":
        if v in meta["choices"]:
            return None
        return f"{v!r} is not one of {', '.join(meta['choices'])}{did_you_mean(str(v).lower(), meta['choices'])}"
    if meta["kind"] == "bool":
        return None if isinstance(v, bool) else f"{v!r} is not true or false"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"{v!r} is not a number"
    if meta["kind"] == "int" and not float(v).is_integer():
        return f"{v!r} is not a whole number"
    if not math.isfinite(v):
        return f"{non_finite(v)} is not a usable number; give a finite value"
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (v < lo or (meta.get("min_open") and v == lo)):
        return f"{v!r} is below the allowed range ({'>' if meta.get('min_open') else '>='} {lo:g})"
    if hi is not None and (v > hi or (meta.get("max_open") and v == hi)):
        return f"{v!r} is above the allowed range ({'<' if meta.get('max_open') else '<='} {hi:g})"
    return None


def non_finite(v: float) -> str:
    return "NaN" if math.isnan(v) else "infinity" if v > 0 else "-infinity"


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """A JSON-safe dict that load.parse_spec() turns back into the same spec."""
    return spec.model_dump(mode="json", exclude_none=True)
