"""The official test scores stored on a study (`best --evaluate`, `--ensemble K`), as `best`, `study
show` and `report` show them. With KMNIST_TUNE_SIGNING_KEY, a score that is not signed for its study
(edited, copied from another study, or stored without the key) is withheld, with one line saying why:
a number labelled "unverified" is still copied into reports and JSON pipelines, and refusing the whole
command would let anyone who can write the database take `best` away from everyone (the validation
results Optuna keeps are still good)."""

from __future__ import annotations

from typing import Any

from ..contract.records import EnsembleEvaluation, TestEvaluation
from ..signing import ENV_KEY, record_refusal


def signed_evaluations(
    study_name: str, study_attrs: dict[str, Any]
) -> tuple[TestEvaluation | None, EnsembleEvaluation | None, list[str]]:
    """(test evaluation, ensemble evaluation, one line for each withheld)."""
    test, ensemble = TestEvaluation.read(study_attrs), EnsembleEvaluation.read(study_attrs)
    withheld = []
    kinds = ((TestEvaluation, "test evaluation", ""), (EnsembleEvaluation, "ensemble evaluation", " --ensemble K"))
    for cls, what, again in kinds:
        why = record_refusal(cls, study_name, study_attrs)
        if why is None:
            continue
        if cls is TestEvaluation:
            test = None
        else:
            ensemble = None
        withheld.append(
            f"the {what} stored on study {study_name!r} is unsigned or not signed with your {ENV_KEY} ({why}); "
            f"not shown: run `kmnist-tune best --study {study_name} --evaluate{again}` with the key to score it again"
        )
    return test, ensemble, withheld
