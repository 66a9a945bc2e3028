"""`kmnist-tune report`: PNG plots of a study and a one-page HTML summary that links them."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..contract.records import FINISHED_STATES, Budget, LRPrior, TrialRecord
from ..contract.space import without_quantiles
from ..contract.spec import SweepSpec
from ..errors import UserError
from ..optuna_internals import study_storage
from ..service.lr_curve import with_curve
from ..service.studies import malformed_trials, records_of, summarize
from .plots import finish, placeholder, plot_prior, pyplot, save_axes, writable_folder


def history_plot(study: optuna.Study, path: Path) -> Path:
    from optuna.visualization.matplotlib import plot_optimization_history

    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        return placeholder(path, "Optimisation history", "no completed trial yet")
    return save_axes(plot_optimization_history(study), path)


def _ped_anova() -> Any:
    """Optuna's PED-ANOVA importance evaluator, imported with scikit-learn held back.

    optuna.importance imports its fANOVA evaluator, which imports scikit-learn at once (about a
    second on a 2-core machine: two thirds of `kmnist-tune report`), although PED-ANOVA needs
    neither scikit-learn nor a model fit. Optuna treats scikit-learn as optional (try_import), so
    holding it back only leaves fANOVA unavailable in this process. Nothing is held back when
    scikit-learn or optuna.importance is loaded already."""
    if "sklearn" not in sys.modules and "optuna.importance" not in sys.modules:
        sys.modules["sklearn"] = None  # type: ignore[assignment]  # `import sklearn` raises ImportError
        try:
            import optuna.importance  # noqa: F401
        finally:
            del sys.modules["sklearn"]
    from optuna.importance import PedAnovaImportanceEvaluator

    return PedAnovaImportanceEvaluator()


def importance_params(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    """The parameters to weigh, one per knob: a W&B distribution drawn through its quantile is stored
    twice (NAME, the value training used, and NAME_quantile, what the sampler proposed), and the
    importance of the pair is NAME's."""
    return sorted(without_quantiles({k: None for t in trials for k in t.params}))


def importance_plot(study: optuna.Study, path: Path) -> Path:
    from optuna.visualization.matplotlib import plot_param_importances

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2 or not complete[0].params:
        return placeholder(path, "Parameter importances", "needs at least 2 completed trials with searched parameters")
    try:
        return save_axes(plot_param_importances(study, evaluator=_ped_anova(), params=importance_params(complete)), path)
    except (RuntimeError, ValueError) as e:  # e.g. every trial has the same parameters
        return placeholder(path, "Parameter importances", f"not computable: {e}")


def top_trials_plot(study: optuna.Study, spec: SweepSpec, path: Path, k: int = 5) -> Path:
    done = [t for t in study.trials if t.state.name in FINISHED_STATES and t.intermediate_values]
    if not done:
        return placeholder(path, "Validation per epoch", "no trial has reported an epoch yet")
    reverse = spec.direction == "maximize"
    top = sorted(
        done, key=lambda t: t.value if t.value is not None else float("-inf") if reverse else float("inf"), reverse=reverse
    )[:k]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for t in top:
        steps = sorted(t.intermediate_values)
        ax.plot(
            steps,  # a step is the number of epochs completed
            [t.intermediate_values[s] for s in steps],
            marker="o",
            label=f"trial {t.number} ({t.state.name.lower()})",
        )
    return finish(
        fig, ax, path, "epoch", f"validation {spec.metric}", f"Validation {spec.metric} per epoch, top {len(top)} trials"
    )


def halving_plot(records: list[tuple[int, TrialRecord]], path: Path) -> Path:
    """The batch sizes each trial started with and used, from the trials' records (number, record)."""
    rows = [
        (n, r.batch_size_initial, r.batch_size_used, len(r.halving_events)) for n, r in records if r.batch_size_used is not None
    ]
    if not rows:
        return placeholder(path, "Batch halving", "no trial has recorded its batch size yet")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    numbers = [r[0] for r in rows]
    ax.bar(numbers, [r[1] or 0 for r in rows], color="#c7d9ef", label="initial batch size")
    ax.bar(numbers, [r[2] or 0 for r in rows], color="#1f77b4", width=0.5, label="batch size used")
    for n, _, used, halvings in rows:
        if halvings:
            ax.annotate(f"{halvings}x", (n, used or 0), ha="center", va="bottom", fontsize=8, color="#d62728")
    ax.set_yscale("log", base=2)
    total = sum(r[3] for r in rows)
    title = f"Batch halving: {total} halving(s) in {sum(1 for r in rows if r[3])} of {len(rows)} trials"
    return finish(fig, ax, path, "trial", "batch size", title)


def shown_params(params: dict[str, Any]) -> str:
    """Parameters as `name=value, ...` (numbers to 4 significant digits), not a Python dict."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def prior_plot(study: optuna.Study, prior: LRPrior | None, path: Path) -> Path:
    """The LR finder's curve (an artifact of the study), or a placeholder that says why there is none."""
    if prior is None:
        return placeholder(path, "LR finder", "this study's lr is not searched with the LR finder")
    try:
        return plot_prior(with_curve(study_storage(study), study.study_name, prior), path)
    except UserError as e:
        return placeholder(path, "LR finder", str(e))


# The page: every value is put in by Jinja2 with autoescape on, so nothing read from the study (its
# name, parameters, records: anyone who shares the database writes them) can add markup or script.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kmnist-tune report: {{ name }}</title>
<style>body{font-family:sans-serif;max-width:760px;margin:2em auto}figure{margin:1.5em 0}</style></head>
<body><h1>Study {{ name }}</h1>
<p>{{ dataset }}, metric {{ metric }} ({{ direction }}); trials: {{ states }};
budget {{ budget }}.</p>
{% if best -%}
<p>Best: trial {{ best.trial }}, validation {{ metric }} <b>{{ best.value }}</b>,
parameters <code>{{ best.params }}</code></p>
{% else -%}
<p>No completed trial yet.</p>
{% endif -%}
{% if test -%}
<p>Official test split (trial {{ test.trial }} retrained): {{ test.metric }} <b>{{ test.value }}</b>
on {{ test.n_test }} images.</p>
{% endif -%}
{% if prior %}<p>{{ prior }}</p>
{% endif -%}
{% if malformed %}<p><small>{{ malformed }}</small></p>
{% endif -%}
{% for title, file in figures -%}
<figure><a href="{{ file }}"><img src="{{ file }}" alt="{{ title }}" width="720"></a>
<figcaption>{{ title }}</figcaption></figure>
{% endfor -%}
<p><small>Written {{ written }} by kmnist-tune.</small></p>
</body></html>
"""


def write_report(study: optuna.Study, spec: SweepSpec, out: Path) -> Path:
    """Writes the PNGs and index.html into `out`; returns the HTML page's path."""
    import jinja2

    # The study's records first: one that does not read is one line, before anything is written.
    with records_of(study.study_name):
        prior = LRPrior.read(study.user_attrs)
    summary = summarize(study, spec, with_trials=False)
    records = [(t.number, TrialRecord.of(t)) for t in study.trials]
    writable_folder(out, "--out")
    figures = [
        ("Optimisation history", history_plot(study, out / "history.png")),
        ("Parameter importances", importance_plot(study, out / "importances.png")),
        ("LR finder", prior_plot(study, prior, out / "lr-finder.png")),
        ("Validation per epoch (top trials)", top_trials_plot(study, spec, out / "top-trials.png")),
        ("Batch halving", halving_plot(records, out / "halving.png")),
    ]
    best, test = summary.best, summary.test_evaluation
    page = (
        jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
        .from_string(PAGE)
        .render(
            name=study.study_name,
            dataset=spec.data.dataset,
            metric=spec.metric,
            direction=spec.direction,
            states=summary.states.describe(),
            budget=Budget(summary.budget["n_trials"], summary.budget["timeout"]).describe(),
            best=best and {"trial": best.trial, "value": f"{best.value:.4f}", "params": shown_params(best.params)},
            test=test and {"trial": test.trial, "metric": test.metric, "value": f"{test.test_value:.4f}", "n_test": test.n_test},
            prior=prior.summary() if prior else None,
            malformed=malformed_trials(dict(records)),
            figures=[(title, p.name) for title, p in figures],
            written=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
