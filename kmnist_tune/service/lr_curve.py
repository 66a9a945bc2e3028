"""The LR finder's curve, kept as an artifact of its study (a small JSON file) rather than in the
study's user attributes: two hundred floats there made every row of `optuna studies` thousands of
characters wide. The study's LRPrior record keeps what workers need (the suggestions and the range)
and names the artifact with its sha256 (and, with KMNIST_TUNE_SIGNING_KEY, its signature for the
study; the record itself is signed too, range and curve entry included: `prior_refusal`).

What is read back is data written by anyone who shares the study database: the artifact id is
checked against the forms this project writes (artifacts.py), the file is size-bounded and hashed as
it is copied, and its JSON must be two equal lists of numbers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

from ..contract.records import PRIOR_ATTR, LRPrior
from ..errors import UserError
from ..signing import ENV_KEY, signer
from .artifacts import BadDownload, artifact_store, download_checked, upload_file

CURVE_FILE = "lr-find-curve.json"
MAX_POINTS = 10_000  # the finder's iterations are at most this (contract/spec.py)
MAX_CURVE_BYTES = 64 * MAX_POINTS  # two floats of at most ~30 characters each per point
_SIGNED_AS = "lr-curve"


def prior_refusal(study_name: str, prior: LRPrior) -> str | None:
    """None when the prior read from study `study_name` is signed for it with this process's key (or
    no key is set); else why not, in a few words."""
    return signer().record_refusal(PRIOR_ATTR, study_name, prior.as_dict())


def untrusted_prior(study_name: str, why: str) -> str:
    """The first half of the line that refuses a study's prior: what is wrong with it."""
    return f"the LR-finder prior of study {study_name!r} is unsigned or not signed with your {ENV_KEY} ({why})"


def store_curve(storage: BaseStorage, study: optuna.Study, prior: LRPrior) -> dict[str, Any]:
    """Upload the prior's curve onto the study; the record of it that the prior keeps (its signature
    names the study)."""
    data = json.dumps({"lrs": prior.lrs, "losses": prior.losses}).encode()
    digest = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CURVE_FILE
        path.write_bytes(data)
        artifact_id = upload_file(storage, study, path, mimetype="application/json")
    return {
        "artifact": artifact_id,
        "sha256": digest,
        "points": len(prior.lrs),
        "signature": signer().sign(_SIGNED_AS, study.study_name, artifact_id, digest),
    }


def with_curve(storage: BaseStorage, study_name: str, prior: LRPrior) -> LRPrior:
    """The prior with its curve: kept in the attributes by an older kmnist-tune, or fetched from its
    artifact and checked. One line saying why when it cannot be had (or, with the signing key, when the
    prior or its curve is not signed for this study)."""
    again = f"run `kmnist-tune lr-find --study {study_name} --force` to compute it again"
    why = prior_refusal(study_name, prior)
    if why is not None:
        raise UserError(f"{untrusted_prior(study_name, why)}; {again} (with the key, which signs it)")
    if prior.lrs:
        return prior
    curve = prior.curve if isinstance(prior.curve, dict) else None
    if curve is None:
        raise UserError(f"study {study_name!r} keeps no LR-finder curve (it could not be stored); {again}")
    artifact_id, digest = curve.get("artifact"), curve.get("sha256")
    why = signer().refusal(curve.get("signature"), _SIGNED_AS, study_name, str(artifact_id), str(digest))
    if why is not None:
        raise UserError(
            f"the LR-finder curve of study {study_name!r} is unsigned or not signed with your {ENV_KEY} ({why}); refused"
        )
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / CURVE_FILE  # a fixed local name: nothing stored names a path here
        try:
            download_checked(artifact_store(storage), artifact_id, target, digest, MAX_CURVE_BYTES)
            data = json.loads(target.read_text(encoding="utf-8"))
        except (BadDownload, ValueError) as e:
            raise UserError(f"the LR-finder curve of study {study_name!r} is damaged ({e}); {again}") from None
        except UserError:
            raise
        except Exception as e:  # a missing artifact store, or one that lost the file
            raise UserError(
                f"the LR-finder curve of study {study_name!r} cannot be read from its artifact store ({type(e).__name__}); "
                f"is KMNIST_TUNE_ARTIFACTS the folder it was stored in? Or {again}"
            ) from None
    lrs, losses = _numbers(data, "lrs"), _numbers(data, "losses")
    if lrs is None or losses is None or len(lrs) != len(losses):
        raise UserError(f"the LR-finder curve of study {study_name!r} is not two lists of numbers of one length; {again}")
    return dataclasses.replace(prior, lrs=lrs, losses=losses)


def _numbers(data: Any, key: str) -> list[float] | None:
    values = data.get(key) if isinstance(data, dict) else None
    if not isinstance(values, list) or len(values) > MAX_POINTS:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return None
    return [float(v) for v in values]  # NaN and infinity included: a diverging loss is what the curve shows
