"""Signatures on what workers and `best --evaluate` store, with a key that is never stored.

A checksum kept in the study database beside the data proves nothing against someone who can write
both, and everyone who shares the database can. With `KMNIST_TUNE_SIGNING_KEY` set (environment or
`.env`), what a study keeps is signed (HMAC-SHA256), and each signature names what it signs and the
study it belongs to (by name, so a study restored into another database keeps its signatures):
- a checkpoint: the trial that saved it and that trial's retry chain, its epoch and batch size, and
  each file's artifact id and sha256 (recipe/checkpoints.py);
- a study record (the LR prior with its range, the test and ensemble evaluations, the kept model with
  every file's sha256, its card's included): the whole record (`sign_record`);
- a model card (model.json of an exported directory): the whole card, which names its study and
  holds every other file's sha256 (training/inference.py).
Loading refuses what is unsigned, signed for another study, or signed with another key. Without the
key nothing is signed and loading trusts whoever can write the study database (the README's
"Security" says so). Imports nothing heavy: every layer may use it.

Version 2 signatures carry a `v2:` prefix and a new domain: a version 1 signature (which named no
study) is refused as such, with the key set, and never taken for a version 2 one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

from .errors import UserError

ENV_KEY = "KMNIST_TUNE_SIGNING_KEY"
MIN_KEY_CHARS = 16
# Bound into every signature, so that one kind of signed thing is never taken for another, nor a
# signature of one version for one of another.
_DOMAIN = "kmnist-tune-signature-v2"
_PREFIX = "v2:"
# What each refusal adds to "unsigned or not signed with your KMNIST_TUNE_SIGNING_KEY".
NO_SIGNATURE = "it carries no signature"
OLD_SIGNATURE = "its signature is of a kmnist-tune from before signatures named their study"
OTHER_SIGNATURE = "signed for another study or trial, changed since, or signed with another key"


def canonical(data: Any) -> str:
    """One text for a JSON value however its keys were ordered: what a record's signature covers."""
    return json.dumps(data, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def json_value(data: Any) -> Any:
    """`data` as it reads back from the study database (through JSON, as Optuna stores attributes):
    tuples become lists, keys strings. Signed in this form, so that what is read back checks."""
    return json.loads(json.dumps(data))


class Signer:
    """Signs and checks with the key from the environment."""

    on = True

    def __init__(self, key: str):
        self._key = key.encode()

    def _mac(self, kind: str, parts: tuple[str, ...]) -> str:
        # A JSON list: no part can run into the next (a name holding a separator is still one part).
        message = json.dumps([_DOMAIN, kind, *parts], ensure_ascii=True).encode()
        return _PREFIX + hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(self, kind: str, *parts: str) -> str | None:
        return self._mac(kind, parts)

    def refusal(self, signature: Any, kind: str, *parts: str) -> str | None:
        """None when `signature` signs these parts with this key; else why not, in a few words."""
        if isinstance(signature, str) and hmac.compare_digest(signature, self._mac(kind, parts)):
            return None
        if not signature:
            return NO_SIGNATURE
        if not isinstance(signature, str) or not signature.startswith(_PREFIX):
            return OLD_SIGNATURE
        return OTHER_SIGNATURE

    def check(self, signature: Any, kind: str, *parts: str) -> bool:
        return self.refusal(signature, kind, *parts) is None

    def sign_record(self, kind: str, study: str, data: dict[str, Any]) -> str | None:
        """The signature of a record of study `study` (its `signature` key, if any, left out)."""
        return self.sign(kind, study, _unsigned(data))

    def record_refusal(self, kind: str, study: str, data: Any) -> str | None:
        """None when `data` (a record read back, its signature in `signature`) is signed for `study`."""
        if not isinstance(data, dict):
            return NO_SIGNATURE
        return self.refusal(data.get("signature"), kind, study, _unsigned(data))


class NoSigner:
    """No key: nothing is signed, and everything is accepted as before (a null object, so callers
    never ask whether signing is on)."""

    on = False

    def sign(self, kind: str, *parts: str) -> str | None:
        return None

    def refusal(self, signature: Any, kind: str, *parts: str) -> str | None:
        return None

    def check(self, signature: Any, kind: str, *parts: str) -> bool:
        return True

    def sign_record(self, kind: str, study: str, data: dict[str, Any]) -> str | None:
        return None

    def record_refusal(self, kind: str, study: str, data: Any) -> str | None:
        return None


def _unsigned(data: dict[str, Any]) -> str:
    return canonical({k: v for k, v in data.items() if k != "signature"})


def signer() -> Signer | NoSigner:
    """The signer of this process: `KMNIST_TUNE_SIGNING_KEY` (the CLI reads `.env` into the environment
    first), or none."""
    key = os.environ.get(ENV_KEY, "")
    if not key:
        return NoSigner()
    if len(key) < MIN_KEY_CHARS:
        raise UserError(f"{ENV_KEY} is shorter than {MIN_KEY_CHARS} characters; use a long random one (`openssl rand -hex 32`)")
    return Signer(key)


def store_signed(record: Any, study: Any) -> None:
    """Store a study record (contract/records.py's StudyRecord) on `study`, signed for it with the key:
    the record as it reads back, with its signature under `signature`."""
    data = json_value(record.as_dict())
    data.pop("signature", None)
    signature = signer().sign_record(record.ATTR, study.study_name, data)
    if signature is not None:
        data["signature"] = signature
    study.set_user_attr(record.ATTR, data)
    if hasattr(record, "signature"):
        record.signature = signature


def record_refusal(cls: Any, study_name: str, study_attrs: dict[str, Any]) -> str | None:
    """None when the record of `cls` in a study's attributes is signed for that study (or no key is
    set, or there is no record); else why not, in a few words."""
    data = study_attrs.get(cls.ATTR)
    if not data:
        return None
    return signer().record_refusal(cls.ATTR, study_name, data)
