"""Password masking, and control characters stripped, for every line kmnist-tune prints or logs
(imports nothing heavy).

Linear in the length of the text: a URL is found by its `://`, its authority scanned once up to
the first character that ends one, and the password is what lies between the first `:` and the
last `@` of the authority (an unescaped `@` in a password is masked with the rest of it). A password
may hold spaces or quotes (a URL typed into a shell within quotes), so where the authority as URLs
end it holds no `@`, the password may run on up to the last `@` before the URL's path or the end of
its line: text that only looks so (`host:8080 ... me@example.org`) is masked too, never shown.
"""

from __future__ import annotations

import logging
import re

# What ends a URL's authority: a path, query or fragment, white space, or quoting around the URL.
_AUTHORITY = re.compile(r"[^/?#\s'\"<>]*")
# How far a password with spaces or quotes in it may run: up to the path, query, fragment or line's end.
_USERINFO = re.compile(r"[^/?#\n]*")
# `password=...` in a libpq DSN or a query string, bare or quoted ('it''s' or 'it\'s' as libpq writes
# quotes inside): alternatives that cannot overlap, so no backtracking.
_SECRET_PARAM = re.compile(r"""(\bpassword\s*=\s*)('(?:[^'\\]|\\.|'')*'?|"(?:[^"\\]|\\.)*"?|[^&\s'"]+)""", re.IGNORECASE)


def mask(text: str) -> str:
    """Replace passwords in any URL (or password= parameter) within `text` with ***, and drop terminal
    control characters (`printable`): every line kmnist-tune prints goes through here."""
    out, start = [], 0
    i = text.find("://")
    while i != -1:
        host = i + 3
        end = _AUTHORITY.match(text, host).end()  # type: ignore[union-attr]
        at = text.rfind("@", host, end)
        if at == -1 and text.find(":", host, end) != -1:  # `user:pass word@host`: a password with spaces
            wide = _USERINFO.match(text, host).end()  # type: ignore[union-attr]
            at = text.rfind("@", host, wide)
            end = max(end, at + 1)
        colon = text.find(":", host, at) if at != -1 else -1
        if colon != -1:
            out.append(text[start : colon + 1])
            out.append("***")
            start = at
        i = text.find("://", max(end - 1, host))  # a URL may start right where this one ends
    out.append(text[start:])
    return printable(_SECRET_PARAM.sub(r"\1***", "".join(out)))


# What must not reach a terminal from text others wrote (a stop reason in the study database, class
# names in a model directory): C0 controls but tab and newline (ESC starts terminal escapes, CR
# overwrites a line), DEL, C1 controls (0x9b is a one-byte CSI), and the bidirectional overrides
# that reorder what a line seems to say.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` without terminal control characters (tab and newline stay)."""
    return _CONTROL.sub("", text)


def has_password(url: str) -> bool:
    return mask(url) != url


class MaskSecrets(logging.Filter):
    """Masks passwords in every log record, whoever logs it (Optuna, SQLAlchemy, us)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        masked = mask(msg)
        if masked != msg:
            record.msg, record.args = masked, None
        return True


def install_log_masking() -> None:
    filt = MaskSecrets()
    for logger in (logging.getLogger(), logging.getLogger("optuna"), logging.getLogger("sqlalchemy")):
        logger.addFilter(filt)
        for h in logger.handlers:
            h.addFilter(filt)
