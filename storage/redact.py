"""Credential redaction for URLs and free text (errors, log lines, stored configuration)."""

from __future__ import annotations

import re

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]*)@")


def redact_url(url: str | None) -> str | None:
    """``redis://:secret@host`` → ``redis://:***@host``; URLs without a password are returned unchanged."""
    if url is None:
        return None
    return redact_text(str(url))


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """Redact URL passwords and any of ``secrets`` from free text."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    for secret in secrets or []:
        if secret:
            text = text.replace(secret, "***")
    return text
