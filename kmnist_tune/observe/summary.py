"""A study summary as the lines a user reads: the end of `run` and `worker`, `best`, `study show`."""

from __future__ import annotations

from typing import Any

from ..contract.records import Budget
from ..service.studies import StudySummary


def _value(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else f"{v}"


def counts_line(s: StudySummary) -> str:
    c = s.states
    waiting = f", {c['WAITING']} waiting" if c["WAITING"] else ""
    return f"study {s.study}: {c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed, {c['RUNNING']} running{waiting}"


def best_lines(s: StudySummary) -> list[str]:
    """The best trial, every training parameter it used, and its official test score if there is one."""
    if s.best is None:
        return ["no completed trial yet"]
    lines = [f"best trial {s.best.trial}: validation {s.metric} {s.best.value:.4f}"]
    lines += [f"  {k}: {_value(v)}" for k, v in (s.best.config or s.best.params).items()]
    ev = s.test_evaluation
    if ev is not None:
        lines.append(
            f"test {ev.metric} of trial {ev.trial} (official test split, {ev.n_test} images; retrained on "
            f"{ev.n_train} train images): {ev.test_value:.4f}"
        )
    elif s.ensemble_evaluation is None:
        # Validation scores choose between trials; published KMNIST figures are test accuracies, which
        # run 1.5-2 points lower. Say where the comparable figure comes from.
        lines.append(
            f"no test score yet (validation picks the trials; published figures are on the official test split); "
            f"for one: kmnist-tune best --study {s.study} --evaluate"
        )
    return lines + ensemble_lines(s)


def ensemble_lines(s: StudySummary) -> list[str]:
    """The ensemble's test score (`best --evaluate --ensemble K`), then each member's beside it."""
    ens = s.ensemble_evaluation
    if ens is None or not isinstance(ens.members, list):
        return []
    trials = ", ".join(str(m.get("trial")) for m in ens.members if isinstance(m, dict))
    lines = [
        f"test {ens.metric} of the ensemble of trials {trials} (official test split, {ens.n_test} images; each "
        f"retrained on {ens.n_train} train images): {_value(ens.test_value)}"
    ]
    tta = ens.tta if isinstance(ens.tta, dict) else None
    if tta is not None:
        lines.append(
            f"  with test-time augmentation ({len(tta.get('shifts') or [])} shifted copies): {_value(tta.get('test_value'))}"
        )
    tta_members = tta.get("members") if tta is not None and isinstance(tta.get("members"), list) else []
    for i, m in enumerate(ens.members):
        if isinstance(m, dict):
            shifted = f"; with shifted copies {_value(tta_members[i])}" if i < len(tta_members) else ""
            test, valid = _value(m.get("test_value")), _value(m.get("valid_value"))
            lines.append(f"  trial {m.get('trial')}: test {test}, validation {valid}{shifted}")
    return lines


def summary_lines(s: StudySummary) -> list[str]:
    return [counts_line(s), *best_lines(s), *([s.malformed] if s.malformed else [])]


def show_lines(s: StudySummary) -> list[str]:
    """`study show`: the summary, then who runs what and which trials are retries."""
    lines = [f"study {s.study} in {s.storage}", *summary_lines(s)]
    b = s.budget
    said = Budget(b["n_trials"], b["timeout"]).describe()
    lines.append(f"budget: {said}" + (f" (set at {b['at']} by {b['by']})" if b["by"] else ""))
    if s.stopped is not None:
        lines.append(f"{s.stopped.describe()}: workers claim no more trials (`kmnist-tune study resume {s.study}`)")
    if s.workers:
        lines.append("workers (host:pid gpu: running trials; finished, failed):")
        for w in s.workers:
            running = ", ".join(str(n) for n in w.running) or "-"
            lines.append(f"  {w.host}:{w.pid} {w.gpu}: running {running}; {w.finished} finished, {w.failed} failed")
    for r in s.retried or []:
        was = (r["retry_of_state"] or "not found").lower()
        lines.append(f"retried: trial {r['trial']} ({r['state'].lower()}) retries trial {r['retry_of']} ({was})")
    return lines
