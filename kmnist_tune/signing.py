"""Signatures on what workers and `best --evaluate` upload, with a key that is never stored.

A checksum kept in the study database beside the data proves nothing against someone who can write
both, and everyone who shares the database can. With `KMNIST_TUNE_SIGNING_KEY` set (environment or
`.env`), each checkpoint file and each file of the kept model is signed (HMAC-SHA256 over what it is,
its artifact id and its sha256), and loading refuses what is unsigned or signed with another key.
Without the key nothing is signed, and loading trusts whoever can write the study database (the
README's "Security" says so). Imports nothing heavy: every layer may use it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from .errors import UserError

ENV_KEY = "KMNIST_TUNE_SIGNING_KEY"
MIN_KEY_CHARS = 16
# Bound into every signature, so that one kind of signed thing is never taken for another.
_DOMAIN = "kmnist-tune-signature-v1"


class Signer:
    """Signs and checks with the key from the environment."""

    on = True

    def __init__(self, key: str):
        self._key = key.encode()

    def _mac(self, kind: str, parts: tuple[str, ...]) -> str:
        message = "\0".join((_DOMAIN, kind, *parts)).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(self, kind: str, *parts: str) -> str | None:
        return self._mac(kind, parts)

    def check(self, signature: Any, kind: str, *parts: str) -> bool:
        return isinstance(signature, str) and hmac.compare_digest(signature, self._mac(kind, parts))


class NoSigner:
    """No key: nothing is signed, and everything is accepted as before (a null object, so callers
    never ask whether signing is on)."""

    on = False

    def sign(self, kind: str, *parts: str) -> str | None:
        return None

    def check(self, signature: Any, kind: str, *parts: str) -> bool:
        return True


def signer() -> Signer | NoSigner:
    """The signer of this process: `KMNIST_TUNE_SIGNING_KEY` (the CLI reads `.env` into the environment
    first), or none."""
    key = os.environ.get(ENV_KEY, "")
    if not key:
        return NoSigner()
    if len(key) < MIN_KEY_CHARS:
        raise UserError(f"{ENV_KEY} is shorter than {MIN_KEY_CHARS} characters; use a long random one (`openssl rand -hex 32`)")
    return Signer(key)
