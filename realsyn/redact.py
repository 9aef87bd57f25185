"""Strip credentials from text that leaves the process: errors, logs, run-failure alerts.

``redact(text)`` replaces the ``user:pass@`` userinfo of every URL, ``Bearer``/``Basic`` tokens,
``Authorization:`` header values, credential query parameters (``api_key=``, ``token=``,
``X-Amz-Signature=``, ...), the values of secret-looking environment variables (names containing
``KEY``, ``TOKEN``, ``SECRET``, ``PASSWORD``, ``CREDENTIAL``; values of 8 characters or more) and
any ``secrets`` passed in, with ``***``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

MASK = "***"
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s?#@]*@")
# a credential after Bearer/Basic: 8+ token characters with a digit or +/= in them, so "Basic validation" stays prose
_AUTH_SCHEME = re.compile(r"\b((?i:bearer|basic))(\s+)(?=[A-Za-z\-._~]*[0-9+/=])[A-Za-z0-9\-._~+/=]{8,}")
_AUTH_HEADER = re.compile(r"(?i)(\b(?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)(?!\*\*\*)[^'\"\r\n,}]+")
_QUERY_SECRET = re.compile(
    r"(?i)([?&;](?:api[_-]?key|apikey|access[_-]?token|auth[_-]?token|token|secret|password|passwd|sig|signature"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential)=)[^&#\s'\"]+"
)
_SECRET_ENV_NAME = re.compile(r"(?i)(key|token|secret|passw|credential)")
_MIN_SECRET_CHARS = 8


def _env_secrets() -> list[str]:
    return [v for k, v in os.environ.items() if _SECRET_ENV_NAME.search(k) and len(v) >= _MIN_SECRET_CHARS]


def redact(text: object, secrets: Iterable[str | None] = ()) -> str:
    """``text`` (any object, as ``str``) with credentials replaced by ``***``."""
    out = str(text)
    for value in sorted({s for s in [*secrets, *_env_secrets()] if s and len(s) >= 4}, key=len, reverse=True):
        out = out.replace(value, MASK)
    out = _USERINFO.sub(rf"\1{MASK}@", out)
    out = _AUTH_SCHEME.sub(rf"\1\2{MASK}", out)
    out = _AUTH_HEADER.sub(rf"\1{MASK}", out)
    return _QUERY_SECRET.sub(rf"\1{MASK}", out)


def strip_userinfo(url: str) -> tuple[str, str | None]:
    """(url without ``user:pass@``, the userinfo or None)."""
    match = _USERINFO.search(url)
    if not match or match.start() != 0:
        return url, None
    userinfo = url[len(match.group(1)) : match.end() - 1]
    return match.group(1) + url[match.end() :], userinfo
