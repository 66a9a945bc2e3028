"""The typed records kmnist-tune keeps beside Optuna's own: one for a trial, one for each epoch and
halving, and the study-level ones (the LR-finder prior, the test evaluation).

This module is the only place that knows the user-attribute keys: writers call `TrialRecord.write`
(or a study record's `store`), readers call `TrialRecord.of` (or a study record's `read`). It works on
anything with Optuna's `set_user_attr` / `user_attrs`, so it imports neither Optuna nor torch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import UserError

if TYPE_CHECKING:
    from .spec import SweepSpec

# Study user attributes.
SPEC_ATTR = "kmnist_tune.spec"
CREATED_ATTR = "kmnist_tune.created"
PRIOR_ATTR = "kmnist_tune.lr_prior"
TEST_ATTR = "kmnist_tune.test_evaluation"
ENSEMBLE_ATTR = "kmnist_tune.ensemble_evaluation"
BUDGET_ATTR = "kmnist_tune.budget"
MODEL_ATTR = "kmnist_tune.model"
STOP_ATTR = "kmnist_tune.stopped"

# Optuna's trial states (by name) that ended for good: what the budget counts and what the progress
# line calls finished. A failed trial is retried or given up on; neither is finished work.
FINISHED_STATES = ("COMPLETE", "PRUNED")


@dataclass
class HalvingEvent:
    """One halving of the batch size, as recorded on the trial and in its W&B run."""

    from_bs: int
    to_bs: int | None  # None: the floor was reached, no further attempt
    reason: str  # "non_finite" | "blowup" | "no_trend" | "oom"
    detail: str
    epoch: int
    batch: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochRecord:
    """One finished epoch of one attempt: what progress lines, W&B and the pruner see."""

    epoch: int
    train_loss: float
    valid_loss: float
    metric: float
    seconds: float
    images_per_s: float
    lr: float | None = None  # the learning rate at the end of the epoch (one-cycle moves it)


@dataclass(frozen=True)
class WorkerInfo:
    """Which process ran a trial: host, pid, GPU (or cpu) and slot."""

    host: str
    pid: int
    gpu: str
    slot: int

    @classmethod
    def here(cls) -> WorkerInfo:
        return cls(
            socket.gethostname(),
            os.getpid(),
            os.environ.get("CUDA_VISIBLE_DEVICES") or "cpu",
            int(os.environ.get("KMNIST_TUNE_SLOT", "0")),
        )

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid} {self.gpu}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class StudyRecord:
    """A record kept in one user attribute of the study (`ATTR`), as a dict of its fields."""

    ATTR: ClassVar[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def store(self, study: Any) -> None:
        study.set_user_attr(self.ATTR, self.as_dict())

    @classmethod
    def read(cls, study_attrs: dict[str, Any]) -> Any:
        """The record stored in a study's user attributes, or None. Unknown keys (a newer version's)
        are left out, missing ones (an older version's) are None. A record of another shape (anyone
        who shares the database can write one) raises MalformedRecord."""
        data = study_attrs.get(cls.ATTR)
        if not data:
            return None
        problem = _misfit(data, cls)
        if problem is not None:
            raise MalformedRecord(cls.ATTR, problem)
        return _built(data, cls)


@dataclass
class Budget(StudyRecord):
    """The study's trial budget and per-process timeout: study state (extend it any time), not part
    of the spec's identity. Studies made before it existed use their spec's `budget:` block."""

    ATTR: ClassVar[str] = BUDGET_ATTR
    n_trials: int | None
    timeout: float | None
    at: str = ""
    by: str = ""

    @classmethod
    def of(cls, study_attrs: dict[str, Any], spec: SweepSpec) -> Budget:
        stored = cls.read(study_attrs)
        return stored if stored is not None else cls(spec.budget.n_trials, spec.budget.timeout)

    @property
    def until_stopped(self) -> bool:
        """No trial limit and no timeout: workers claim until `study stop` (a W&B sweep without run_cap)."""
        return self.n_trials is None and self.timeout is None

    def describe(self) -> str:
        if self.until_stopped:
            return "until stopped"
        parts = [f"{self.n_trials} trials" if self.n_trials is not None else "no trial limit"]
        if self.timeout is not None:
            parts.append(f"{self.timeout:g} s per worker")
        return ", ".join(parts)


@dataclass
class StudyStop(StudyRecord):
    """`study stop`: workers claim no more trials (with `now`, they hand running ones back too)."""

    ATTR: ClassVar[str] = STOP_ATTR
    at: str
    by: str
    now: bool = False
    reason: str | None = None  # why, when no user asked (a trial reached the spec's target)

    def describe(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"stopped{' (now)' if self.now else ''} at {self.at} by {self.by}{why}"


def who_and_when() -> tuple[str, str]:
    """(UTC time, user@host) for records of who changed a study."""
    import datetime as dt
    import getpass

    try:
        user = getpass.getuser()
    except Exception:  # no user name in a container without a passwd entry
        user = str(os.getuid())
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), f"{user}@{socket.gethostname()}"


@dataclass
class KeptModel(StudyRecord):
    """The retrained winner kept on the study: its model directory, file by file, in the study's
    artifact store (`best --evaluate` writes it, `export` fetches it). With KMNIST_TUNE_SIGNING_KEY the
    stored record carries a signature for its study (signing.store_signed), which covers every file's
    sha256, the model card's included."""

    ATTR: ClassVar[str] = MODEL_ATTR
    trial: int
    at: str
    artifacts: dict[str, str]  # file name in the model directory -> artifact id
    sha256: dict[str, str]
    members: list[int] | None = None  # an ensemble's trials (`best --evaluate --ensemble K`), best first


@dataclass
class TestEvaluation(StudyRecord):
    """The official test score of a retrained trial (`best --evaluate`), stored on the study (signed for
    it with KMNIST_TUNE_SIGNING_KEY: signing.store_signed)."""

    ATTR: ClassVar[str] = TEST_ATTR
    trial: int
    metric: str
    test_value: float
    valid_value: float | None
    n_train: int
    n_test: int
    params: dict[str, Any]
    device: str
    at: str


@dataclass
class EnsembleEvaluation(StudyRecord):
    """The official test score of the top trials, each retrained, their softmax outputs averaged
    (`best --evaluate --ensemble K`), beside each member's own score; stored on the study (signed as
    the test evaluation is)."""

    ATTR: ClassVar[str] = ENSEMBLE_ATTR
    metric: str
    test_value: float  # the averaged members, on the images as they are
    members: list[dict[str, Any]]  # best first: {"trial", "valid_value", "test_value", "params"}
    tta: dict[str, Any] | None  # with --tta: {"shifts", "test_value", "members": [each member's]}
    n_train: int
    n_test: int
    device: str
    seconds: float
    at: str


@dataclass
class TrialRecord:
    """Everything kmnist-tune records about one trial beyond Optuna's params, values and state."""

    config: dict[str, Any] | None = None  # every training parameter, searched or fixed
    device: str | None = None
    compile: str | None = None  # "compiled", or "fell back: <reason>" (training/compiling.py); None: not asked
    recompiles: int | None = None  # graphs dynamo compiled during the trial's fits, beyond the compile check
    loop: str | None = None  # the training loop used: "fast" (training/loop.py) or "fastai" (asked, or fallen back to)
    threads: int | None = None  # CPU threads at the start: this process's share of the host (service/cpu_share.py)
    worker: WorkerInfo | None = None
    retry_of: int | None = None  # the trial this one retries (a dead, stale or stopped worker's)
    enqueued: str | None = None  # why it was queued before sampling (the LR finder's suggestion)
    batch_size_initial: int | None = None
    batch_size_used: int | None = None
    attempts: int | None = None
    halving_events: list[HalvingEvent] = field(default_factory=list)
    stopped: str | None = None  # why the halving rule gave up (the trial is then pruned)
    interrupted: str | None = None  # the signal that handed the trial back
    error: str | None = None
    checkpoint: dict[str, Any] | None = None  # the newest: {"epoch", "model", "meta", "batch_size"} (artifact ids)
    resumed_from: dict[str, int] | None = None  # {"trial", "epoch"}: the checkpoint this trial continued
    epoch_seconds: list[float] = field(default_factory=list)
    train_images_per_s: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    valid_loss: list[float] = field(default_factory=list)
    # Not a trial attribute (Optuna freezes a finished trial's attributes): attached by `of` from the
    # study's test evaluation when it is of this trial.
    test_evaluation: TestEvaluation | None = None
    # Not stored either: the keys whose stored value had another shape (key -> what is wrong), read as
    # absent. Workers carry on without them; what shows a trial says so (`malformed_line`).
    malformed: dict[str, str] = field(default_factory=dict)

    # Field -> user-attribute key, where they differ (keys of studies written by earlier versions).
    KEYS: ClassVar[dict[str, str]] = {"enqueued": "kmnist_tune.enqueued"}
    NOT_STORED: ClassVar[frozenset[str]] = frozenset({"test_evaluation", "malformed"})

    @classmethod
    def key(cls, name: str) -> str:
        if name not in _names(cls) or name in cls.NOT_STORED:
            raise KeyError(f"TrialRecord has no stored field {name!r}")
        return cls.KEYS.get(name, name)

    @classmethod
    def write(cls, trial: Any, **fields: Any) -> None:
        """Store the given fields on a running trial (anything with Optuna's `set_user_attr`)."""
        for name, value in fields.items():
            trial.set_user_attr(cls.key(name), _encode(value))

    @classmethod
    def of(cls, trial: Any, study_attrs: dict[str, Any] | None = None) -> TrialRecord:
        """The record of a trial (a FrozenTrial, a Trial, or its user-attrs dict)."""
        attrs: dict[str, Any] = trial if isinstance(trial, dict) else trial.user_attrs
        rec = cls()
        hints = _hints(cls)
        for name in [f.name for f in dataclasses.fields(cls) if f.name not in cls.NOT_STORED]:
            key = cls.KEYS.get(name, name)
            if attrs.get(key) is None:
                continue  # absent: the field's default
            problem = _misfit(attrs[key], hints[name])
            if problem is None:
                setattr(rec, name, _built(attrs[key], hints[name]))
            else:
                rec.malformed[key] = problem
        rec.halving_events = rec.halving_events or []
        number = getattr(trial, "number", None)
        test = TestEvaluation.read(study_attrs or {})
        if test is not None and test.trial == number:
            rec.test_evaluation = test
        return rec

    def malformed_line(self, number: int) -> str | None:
        """One line about the fields of this trial's record that had another shape (None: none had).
        A finished trial's attributes cannot be changed, so they are shown as left out, never fatal."""
        if not self.malformed:
            return None
        key, problem = next(iter(self.malformed.items()))
        more = f" (and {len(self.malformed) - 1} more of its attributes)" if len(self.malformed) > 1 else ""
        return f"trial {number}: its attribute {key} {problem}{more}; {_UNWRITTEN}: left out"

    @classmethod
    def fresh(cls) -> dict[str, Any]:
        """The fields of how an attempt went, emptied: a retry starts with its original's attributes
        (Optuna copies them) and must not keep its `interrupted`, `error` or timings."""
        # The checkpoint stays: it is what the retry resumes from.
        keep = {"config", "enqueued", "retry_of", "worker", "checkpoint"} | cls.NOT_STORED
        return {
            f.name: _encode(f.default_factory() if callable(f.default_factory) else f.default)
            for f in dataclasses.fields(cls)
            if f.name not in keep
        }

    @staticmethod
    def timings(epochs: list[EpochRecord]) -> dict[str, list[float]]:
        """The per-epoch fields of a finished attempt, rounded for storage."""
        return {
            "epoch_seconds": [round(e.seconds, 3) for e in epochs],
            "train_images_per_s": [round(e.images_per_s, 1) for e in epochs],
            "train_loss": [round(e.train_loss, 5) for e in epochs],
            "valid_loss": [round(e.valid_loss, 5) for e in epochs],
        }


@dataclass
class LRPrior(StudyRecord):
    """fastai's LR-finder curve for a study key, its suggestions, and the search range centred on one."""

    ATTR: ClassVar[str] = PRIOR_ATTR
    key: str
    suggestions: dict[str, float]
    suggestion: str  # which one is the centre
    centre: float
    low: float
    high: float
    width: float
    computed_at: str
    seconds: float
    host: str
    # The curve itself is an artifact of the study (service/lr_curve.py), named by `curve`: {artifact,
    # sha256, points, signature}. lrs and losses are filled in memory (and stored by older versions).
    curve: dict[str, Any] | None = None
    # With KMNIST_TUNE_SIGNING_KEY: the whole record's, range and curve included, for its study
    # (signing.store_signed). Workers sample from a range only when it is signed (recipe/lr_prior.py).
    signature: str | None = None
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lrs, self.losses = list(self.lrs or []), list(self.losses or [])  # read(): None when not stored

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("lrs", "losses")}

    @property
    def points(self) -> int:
        """The curve's length (the finder's iterations, fewer when it stopped on a diverging loss)."""
        if self.lrs:
            return len(self.lrs)
        n = self.curve.get("points") if isinstance(self.curve, dict) else None
        return n if isinstance(n, int) and not isinstance(n, bool) else 0

    def resolve(self, spec: SweepSpec) -> SweepSpec:
        """The spec with `lr: {distribution: lr_finder}` replaced by this prior's log-uniform range."""
        return spec.with_lr_range(self.low, self.high)

    def summary(self) -> str:
        sugg = ", ".join(f"{k} {v:.3g}" for k, v in self.suggestions.items())
        return (
            f"LR finder ({self.key}): {sugg}; centre {self.centre:.3g} ({self.suggestion}), "
            f"search {self.low:.3g} .. {self.high:.3g} ({self.width:g} decades)"
        )


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# -- records read from storage: checked against their fields' types ----------------------------------

# How to set each study record right, by key ({study}: the study's name).
_FIXES = {
    BUDGET_ATTR: "`kmnist-tune study extend {study} --n-trials N` writes it again",
    STOP_ATTR: "`kmnist-tune study resume {study}` clears it",
    TEST_ATTR: "`kmnist-tune best --study {study} --evaluate` writes it again",
    ENSEMBLE_ATTR: "`kmnist-tune best --study {study} --evaluate --ensemble K` writes it again",
    MODEL_ATTR: "`kmnist-tune best --study {study} --evaluate` writes it again",
    PRIOR_ATTR: "set it to null (Optuna's `study.set_user_attr`) and the next worker computes it again",
}
_UNWRITTEN = "kmnist-tune never writes that (someone who shares the study database did)"


class MalformedRecord(UserError):
    """A study's record that is not of its kind's shape (anyone who shares the study database can
    write one): one line saying which study and attribute, what is wrong and how to set it right."""

    def __init__(self, key: str, problem: str, study: str | None = None) -> None:
        self.key, self.problem, self.study = key, problem, study
        where = f"study {study!r}" if study is not None else "the study"
        fix = _FIXES.get(key, "set it to null to clear it").format(study=study if study is not None else "STUDY")
        super().__init__(f"{where}: its attribute {key} {problem}; {_UNWRITTEN}: {fix}")

    def in_study(self, name: str) -> MalformedRecord:
        """The same line, naming the study."""
        return self if self.study is not None else MalformedRecord(self.key, self.problem, name)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# JSON's names for what a stored value is, and what a field asks for.
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "an object"}


def _shown(value: Any) -> str:
    """A stored value in a line: a short, escaped form (no control characters, no newline) and its type."""
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} ({_JSON_NAMES.get(type(value), 'null' if value is None else type(value).__name__)})"


def _misfit(value: Any, hint: Any, path: str = "") -> str | None:
    """What is wrong with `value` as a `hint` (None: it fits). Written out rather than left to a
    validator: a record's field with a default may be absent (an older version's record), read as
    None as ever, and a stored value is never converted ("5" for a number, true for an integer are
    wrong, not coerced)."""
    where = f" in {path}" if path else ""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_misfit(value, a, path) for a in args if a is not type(None)]
        return None if None in problems else problems[0]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            return f"is {_shown(value)}{where}, not an object with {', '.join(sorted(_names(hint)))}"
        hints = _hints(hint)
        for f in dataclasses.fields(hint):
            inner = f"{path}.{f.name}" if path else f.name
            if value.get(f.name) is not None:
                problem = _misfit(value[f.name], hints[f.name], inner)
                if problem is not None:
                    return problem
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and _misfit(None, hints[f.name]):
                return f"has no {inner}"  # a field every version writes (one with a default may be absent)
        return None
    if origin is list:
        if not isinstance(value, list):
            return f"holds {_shown(value)}{where}, not a list"
        return next((p for i, v in enumerate(value) if (p := _misfit(v, args[0], f"{path}[{i}]")) is not None), None)
    if origin is dict:
        if not isinstance(value, dict):
            return f"holds {_shown(value)}{where}, not an object"
        return next((p for k, v in value.items() if (p := _misfit(v, args[1], f"{path}.{k}")) is not None), None)
    fits = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),  # JSON writes 2.0 as 2 too
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(hint)
    if fits is None or fits(value):
        return None
    return f"holds {_shown(value)}{where}, not {_JSON_NAMES[hint]}"


def _built(value: Any, hint: Any) -> Any:
    """A value that fits `hint` (_misfit), its records made objects (missing fields None)."""
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        hints = _hints(hint)
        return hint(**{k: _built(value.get(k), hints[k]) for k in _names(hint)})
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for a in typing.get_args(hint):
            if a is not type(None) and value is not None and _misfit(value, a) is None:
                return _built(value, a)
        return value
    if typing.get_origin(hint) is list and isinstance(value, list):
        return [_built(v, typing.get_args(hint)[0]) for v in value]
    return value


def _encode(value: Any) -> Any:
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value
