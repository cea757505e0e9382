"""The grammar of camera source URLs, and what of such a URL may be shown.

A camera is configured as one URL (a file, ``rtsp://``, ``http(s)://``, ``rtmp://``,
``usb://N``, ``test://pattern``). ``parse_source`` validates it, so a typo is a config error
with its field path (``edge_agent.config`` runs it in the camera's validator), and capture
opens what this grammar accepted. A URL may carry the camera's password (in the user info, or
as a query parameter for cameras that want it there); it goes to the camera only, never into a
log line, a metric, an API answer or telemetry: ``redact_url`` is the one way such a URL is
shown, ``redact_text`` scrubs text that may quote it (an error from OpenCV or FFmpeg).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import SplitResult, parse_qs, parse_qsl, unquote, urlencode, urlsplit

SourceKind = Literal["file", "stream", "usb", "test"]
_STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https")
#: Test pattern parameters: name -> (lowest, highest, default).
_TEST_PARAMS = {"width": (16, 7680, 640), "height": (16, 4320, 480), "fps": (0.1, 1000, 30)}


@dataclass(frozen=True)
class SourceSpec:
    """A parsed camera source URL."""

    kind: SourceKind
    #: File path, stream URL, device index (as text) or ``pattern``.
    target: str
    #: Test pattern parameters (width, height, fps).
    params: dict[str, float] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        """Live sources pace themselves; only files are paced (or not) by the reader."""
        return self.kind != "file"


def parse_source(url: str) -> SourceSpec:
    """Parse a camera URL; raise ``ValueError`` with a message that says what is accepted."""
    if not url or not url.strip():
        raise ValueError("camera URL is empty")
    if "://" not in url:
        return SourceSpec("file", url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    parse = _SCHEMES.get("stream" if scheme in _STREAM_SCHEMES else scheme)
    if parse is None:
        raise ValueError(
            f"unsupported source scheme {scheme!r}: use a file path, file://, rtsp://, "
            "http(s)://, rtmp://, usb://N or test://pattern"
        )
    return parse(url, parts)


def _file_source(url: str, parts: SplitResult) -> SourceSpec:
    path = parts.path if not parts.netloc else parts.netloc + parts.path
    if not path:
        raise ValueError("file:// URL has no path")
    return SourceSpec("file", path)


def _stream_source(url: str, parts: SplitResult) -> SourceSpec:
    if not parts.hostname:
        raise ValueError(f"{parts.scheme.lower()}:// URL has no host")
    return SourceSpec("stream", url)


def _usb_source(url: str, parts: SplitResult) -> SourceSpec:
    idx = parts.netloc or parts.path.lstrip("/")
    if not idx.isdigit():
        raise ValueError("usb:// needs a device index, e.g. usb://0")
    return SourceSpec("usb", idx)


def _test_source(url: str, parts: SplitResult) -> SourceSpec:
    if parts.netloc != "pattern":
        raise ValueError("test:// supports only test://pattern")
    params: dict[str, float] = {}
    for key, values in parse_qs(parts.query, strict_parsing=False).items():
        if key not in _TEST_PARAMS:
            raise ValueError(f"test://pattern: unknown parameter {key!r}")
        lo, hi, _ = _TEST_PARAMS[key]
        try:
            val = float(values[-1])
        except ValueError:
            raise ValueError(f"test://pattern: {key} must be a number") from None
        if not lo <= val <= hi:
            raise ValueError(f"test://pattern: {key} must be in [{lo}, {hi}]")
        params[key] = val
    for key, (_, _, default) in _TEST_PARAMS.items():
        params.setdefault(key, float(default))
    return SourceSpec("test", "pattern", params)


_SCHEMES = {"file": _file_source, "stream": _stream_source, "usb": _usb_source,
            "test": _test_source}

#: Query parameters that carry credentials in some cameras' URLs (``?user=admin&password=x``);
#: matched as substrings of the lower-cased name.
_SECRET_PARAMS = ("pass", "pwd", "token", "secret", "key", "auth", "sig", "cred")
#: What a credential is replaced with.
REDACTED = "***"


def _secret_query(query: str) -> list[tuple[str, str]]:
    pairs = parse_qsl(query, keep_blank_values=True)
    return [(k, v) for k, v in pairs if v and any(p in k.lower() for p in _SECRET_PARAMS)]


def url_secrets(url: str) -> list[str]:
    """The credentials in a URL (the password, secret query values), as written and decoded,
    longest first: what ``redact_text`` removes from text that may quote the URL."""
    if "://" not in url:
        return []
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    found = {v for _, v in _secret_query(parts.query)}
    if password:
        found |= {password, unquote(password)}
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    if ":" in userinfo:
        found.add(userinfo.partition(":")[2])
    return sorted((s for s in found if s), key=len, reverse=True)


def redact_url(url: str) -> str:
    """``url`` without its credentials: ``rtsp://user:***@host/…``, secret query values
    ``***``. The one way a camera URL is shown (logs, metrics, ``/v1/cameras``)."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url, url_secrets(url))
    netloc = parts.netloc
    if "@" in netloc and ":" in netloc.rpartition("@")[0]:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{REDACTED}@{hostport}" if user else f"{REDACTED}@{hostport}"
    query = parts.query
    secret = dict(_secret_query(query))
    if secret:
        query = urlencode([(k, REDACTED if k in secret else v)
                           for k, v in parse_qsl(query, keep_blank_values=True)], safe="*")
    return parts._replace(netloc=netloc, query=query).geturl()


def redact_text(text: str, secrets: list[str]) -> str:
    """``text`` with every one of ``secrets`` replaced by ``***`` (an error message from
    OpenCV or FFmpeg may quote the URL it was given, in any form)."""
    for secret in secrets:
        if len(secret) >= 2:
            text = text.replace(secret, REDACTED)
    return text
