"""Credentials out of every URI before it reaches a log, a report, an MLflow parameter, tag or run
name, or an error message: the one function the steps use for that.

    redact("https://me:t0ken@host/r18.pt?X-Amz-Signature=abc&v=2")  ->  "https://host/r18.pt?v=2"

It removes the user information (`user:password@`, whatever characters RFC 3986 lets it hold, sub-delimiters
such as `(`, `)` and `'` included) and every query parameter that carries a credential (AWS and GCS
signatures and tokens, Azure SAS `sig`, `token`, `access_token`, `key`, `password`, ...), keeping the rest,
in a URI or in any text that contains URIs. Our own scan, not urllib's parser: urlsplit raises on a URI with
a bad port, and a URI in prose has no delimiter that tells where it ends.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode

SECRET_PARAMETERS = frozenset(name.lower() for name in (
    "X-Amz-Credential", "X-Amz-Signature", "X-Amz-Security-Token", "AWSAccessKeyId", "Signature",
    "X-Goog-Credential", "X-Goog-Signature", "GoogleAccessId", "sig", "token", "access_token", "id_token",
    "refresh_token", "key", "api_key", "apikey", "password", "passwd", "secret", "client_secret", "signature",
    "auth", "authorization", "credential", "credentials", "sas", "code"))
# A URI in text: a scheme, then everything a URI may hold up to white space or a character that cannot be
# in one. RFC 3986's sub-delimiters (! $ & ' ( ) * + , ; =) may be in its user information and query;
# brackets only in the authority (an IPv6 host).
URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"<>{}\\^`|/?#]*(?:[/?#][^\s\"<>\[\]{}\\^`|]*)?")
TRAILING = "'\",.;:!?"  # prose punctuation after a URI, not part of it (unless a secret was there: it goes)


def _trim(uri: str) -> tuple[str, str]:
    """(the URI, prose punctuation that followed it): a closing parenthesis without its opening one in the
    URI belongs to the text around it."""
    end = len(uri)
    while end and (uri[end - 1] in TRAILING or (uri[end - 1] == ")" and uri[:end].count("(") < uri[:end].count(")"))):
        end -= 1
    return uri[:end], uri[end:]


def _redact_uri(uri: str) -> str:
    uri, tail = _trim(uri)
    scheme, rest = uri.split("://", 1)
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    authority, after = rest[:end], rest[end:]
    if "@" in authority:  # user information: everything up to the last @ (an unescaped @ in a password too)
        authority = authority.rsplit("@", 1)[1]
    path, question, query = after.partition("?")
    query, hash_, fragment = query.partition("#")
    if question:
        pairs = parse_qsl(query, keep_blank_values=True)
        kept = [(k, v) for k, v in pairs if k.lower() not in SECRET_PARAMETERS]
        if len(kept) != len(pairs):
            query = urlencode(kept, safe=":/@,()'!*$;")
            question = "?" if kept else ""
    return f"{scheme}://{authority}{path}{question}{query}{hash_}{fragment}{tail}"


def redact(text: str) -> str:
    """`text` with every URI in it redacted (a URI alone is a text with one URI)."""
    return URI.sub(lambda m: _redact_uri(m.group(0)), text) if "://" in text else text
