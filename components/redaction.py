"""Credentials out of every URI before it reaches a log, a report, an MLflow parameter, tag or run
name, or an error message: the one function the steps use for that.

    redact("https://me:t0ken@host/r18.pt?X-Amz-Signature=abc&v=2")  ->  "https://host/r18.pt?v=2"

It removes the user information (`user:password@`) and every query parameter that carries a
credential (AWS and GCS signatures and tokens, Azure SAS `sig`, `token`, `access_token`, `key`,
`password`, ...), keeping the rest, in a URI or in any text that contains URIs.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_PARAMETERS = frozenset(name.lower() for name in (
    "X-Amz-Credential", "X-Amz-Signature", "X-Amz-Security-Token", "AWSAccessKeyId", "Signature",
    "X-Goog-Credential", "X-Goog-Signature", "GoogleAccessId", "sig", "token", "access_token", "id_token",
    "refresh_token", "key", "api_key", "apikey", "password", "passwd", "secret", "client_secret", "signature",
    "auth", "authorization", "credential", "credentials", "sas", "code"))
URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")


def _redact_uri(uri: str) -> str:
    try:
        parts = urlsplit(uri)
    except ValueError:  # not parseable as a URL (a bad port, say): keep only its scheme
        return uri.split("://", 1)[0] + "://<redacted>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in query if k.lower() not in SECRET_PARAMETERS]
    if netloc == parts.netloc and len(kept) == len(query):
        return uri  # nothing secret: leave it exactly as written
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(kept, safe=":/@,"), parts.fragment))


def redact(text: str) -> str:
    """`text` with every URI in it redacted (a URI alone is a text with one URI)."""
    return URI.sub(lambda m: _redact_uri(m.group(0)), text) if "://" in text else text
