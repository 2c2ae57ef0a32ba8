"""Credential redaction for URLs and free text (errors, log lines, stored configuration).

One rule for both: the password of a URL's userinfo (everything between ``user:`` and the last ``@`` of the
authority, whatever characters it holds, ``@`` ``:`` ``/`` included) and the values of query parameters that
carry secrets (``password``, ``sslpassword``, tokens, keys, signatures) become ``***``. Redaction errs on the
side of hiding too much: an ``@`` later in a URL makes everything before it count as userinfo.
"""

from __future__ import annotations

import re

MASK = "***"

# Query parameters whose values are secrets (PostgreSQL and Redis URLs, pre-signed S3 links, API tokens).
SECRET_PARAMETERS = (
    "password", "passwd", "pwd", "pass", "sslpassword", "secret", "client_secret", "token", "access_token",
    "auth_token", "refresh_token", "api_key", "apikey", "access_key", "secret_key", "aws_secret_access_key",
    "x-amz-security-token", "x-amz-credential", "x-amz-signature", "signature", "sig", "auth",
)
_PARAMETER = re.compile(
    r"(?P<lead>[?&;](?:" + "|".join(re.escape(name) for name in SECRET_PARAMETERS) + r")=)(?P<value>[^&;#\s]*)",
    re.IGNORECASE,
)
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*://")
# In free text a URL ends at whitespace, so its userinfo runs to the last "@" before the next whitespace.
_TEXT_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>\S*)@")


def redact_url(url: str | None) -> str | None:
    """One URL: ``postgresql://u:p@ss/w:rd@host/db?sslpassword=x`` → ``postgresql://u:***@host/db?sslpassword=***``.
    A URL without credentials is returned unchanged."""
    if url is None:
        return None
    url = str(url)
    scheme = _SCHEME.match(url)
    if scheme is not None:
        rest = url[scheme.end():]
        at = rest.rfind("@")
        if at >= 0 and ":" in rest[:at]:
            user = rest[:at].split(":", 1)[0]
            rest = f"{user}:{MASK}{rest[at:]}"
        url = url[: scheme.end()] + rest
    return _PARAMETER.sub(lambda m: m["lead"] + MASK, url)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """Redact URL passwords, secret query parameters and any of ``secrets`` from free text."""
    for secret in sorted((s for s in secrets or [] if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _TEXT_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _PARAMETER.sub(lambda m: m["lead"] + MASK, text)
