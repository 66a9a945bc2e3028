"""Password masking for every line kmnist-tune prints or logs (imports nothing heavy)."""

from __future__ import annotations

import logging
import re

_SECRET_IN_URL = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)@")
_SECRET_PARAM = re.compile(r"(?P<head>\bpassword=)(?P<pw>[^&\s]+)", re.IGNORECASE)


def mask(text: str) -> str:
    """Replace passwords in any URL (or password= parameter) within `text` with ***."""
    text = _SECRET_IN_URL.sub(lambda m: m.group("head") + "***@", text)
    return _SECRET_PARAM.sub(lambda m: m.group("head") + "***", text)


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
