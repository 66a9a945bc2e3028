"""optuna-dashboard notes: the recipe's evidence where the dashboard shows it. A note on every trial
(a listener on its end) and, on the study, the LR-finder suggestions with the curve as an artifact."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

from ..contract.events import Listener, TrialEnd
from ..contract.records import Budget, LRPrior, MalformedRecord, StudyRecord, StudyStop, TrialRecord
from ..errors import one_line


def trial_note(number: int, state: str, value: float | None, metric: str, rec: TrialRecord) -> str:
    """The markdown note optuna-dashboard shows on a trial: the recipe's evidence at a glance."""
    lines = [f"### Trial {number}: {state.lower()}" + (f", {metric} {value:.4f}" if value is not None else "")]
    if rec.batch_size_used is not None:
        lines.append(f"- batch size: {rec.batch_size_initial} → {rec.batch_size_used} used ({rec.attempts or 1} attempt(s))")
    elif rec.batch_size_initial is not None:  # it ended (failed, handed back) before an attempt did
        lines.append(f"- batch size: {rec.batch_size_initial} at the start; no attempt finished")
    if rec.halving_events:
        lines.append("- halvings:")
        for e in rec.halving_events:
            to = e.to_bs if e.to_bs else "stop (minimum reached)"
            where = f" at epoch {e.epoch}, batch {e.batch}" if e.epoch >= 0 else ""
            lines.append(f"  - {e.from_bs} → {to}: {e.reason}{where} — {e.detail}")
    else:
        lines.append("- halvings: none")
    if rec.epoch_seconds:
        lines.append(f"- seconds per epoch: {', '.join(f'{s:.1f}' for s in rec.epoch_seconds)}")
        lines.append(f"- training images/s: {', '.join(f'{i:,.0f}' for i in rec.train_images_per_s)}")
    if rec.device:
        lines.append(f"- device: {rec.device}")
    if rec.retry_of is not None:
        lines.append(f"- retry of trial {rec.retry_of}")
    if rec.resumed_from:
        lines.append(f"- resumed from trial {rec.resumed_from['trial']}'s checkpoint at epoch {rec.resumed_from['epoch'] + 1}")
    if rec.stopped:
        lines.append(f"- stopped: {rec.stopped}")
    return "\n".join(lines)


class NoteListener(Listener):
    """Saves a trial's note when it ends, whatever the outcome."""

    def trial_finished(self, end: TrialEnd) -> None:
        from optuna_dashboard import save_note

        if end.trial is not None:
            save_note(end.trial, trial_note(end.number, end.state, end.value, end.metric, end.record))
            if end.stopped_study:  # the study's note says it stopped, and why
                refresh_study_note(end.trial.study)


def _decades(width: float) -> str:
    return f"{width:g} decade" + ("" if width == 1 else "s")


def prior_note(prior: LRPrior, study_name: str) -> str:
    rows = "\n".join(f"| {k} | {v:.3g}{' ← centre' if k == prior.suggestion else ''} |" for k, v in prior.suggestions.items())
    return (
        f"## LR finder ({prior.key})\n\nfastai `lr_find`, {prior.points} iterations on the training split, "
        f"{prior.seconds:.1f} s on {prior.host} at {prior.computed_at}.\n\n| suggestion | lr |\n|---|---|\n{rows}\n\n"
        f"The learning rate of study **{study_name}** is searched log-uniformly over "
        f"**{prior.low:.3g} … {prior.high:.3g}** ({_decades(prior.width)} around the {prior.suggestion} suggestion); "
        "the suggestion itself was the first trial. The curve is attached as `lr-find.png`."
    )


def study_note(study_name: str, attrs: dict[str, Any]) -> str:
    """The study's note: its state (budget, stopped?) and, when there is one, the LR-finder evidence.
    A record of another shape (anyone who shares the database can write one) is a line of the note:
    the note is written after `study extend`, `stop` and `resume`, which must not fail on it."""
    problems: list[str] = []

    def read(record: type[StudyRecord]) -> Any:
        try:
            return record.read(attrs)
        except MalformedRecord as e:
            problems.append(f"- {e.in_study(study_name)}")
            return None

    budget, stopped, prior = read(Budget), read(StudyStop), read(LRPrior)
    lines = [f"## Study {study_name}", *problems]
    if budget is not None:
        lines.append(f"- budget: {budget.describe()}" + (f" (set at {budget.at} by {budget.by})" if budget.by else ""))
    lines.append(
        f"- **{stopped.describe()}**; `kmnist-tune study resume {study_name}` lets workers claim again"
        if stopped
        else "- running: workers may claim trials"
    )
    return "\n".join(lines) + ("\n\n" + prior_note(prior, study_name) if prior else "")


def refresh_study_note(study: optuna.Study) -> None:
    """Write the study's note for optuna-dashboard again (after the prior, a budget change, a stop)."""
    from optuna_dashboard import save_note

    save_note(study, study_note(study.study_name, study.user_attrs))


def attach_prior(study: optuna.Study, storage: BaseStorage, prior: LRPrior, say: Callable[[str], None]) -> None:
    """The LR-finder curve (a PNG artifact) and a note with its suggestions, on the study. Evidence,
    not results: the sweep goes on without it when it cannot be written."""
    from ..service.artifacts import upload_file
    from .plots import plot_prior

    try:
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_prior(prior, Path(tmp) / "lr-find.png", title=f"{study.study_name}: LR finder ({prior.key})")
            upload_file(storage, study, png, mimetype="image/png")
        refresh_study_note(study)
    except Exception as e:
        say(f"could not attach the LR-finder plot to the study ({type(e).__name__}: {one_line(e, 120)})")
