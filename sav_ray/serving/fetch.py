"""Image URLs a server may fetch: checked against an allowlist, normalised, downloaded under a
deadline. Pure standard library; the server's request code (`sav_ray.serving.requests`) calls it.

A URL is allowed only when, after parsing and percent-decoding, it has the scheme, host and
port of an allowed prefix and its path segments start with the prefix's segments (a prefix
`http://host/ok/` allows `http://host/ok/a.png`, never `http://host/okay.png`). Refused outright,
before any network access, so the answer is the same whether or not the target exists:
control characters and spaces, userinfo (`user@host`), `.` and `..` segments, empty segments,
backslashes, percent-encoded dots, slashes, backslashes or NUL, and invalid percent-encoding.
What is fetched is exactly the normalised URL (lower-case scheme and host, default port
dropped, path re-encoded from its decoded segments, no fragment).

`download` reads at most `max_bytes` and gives up at a deadline for the whole download, not per
socket read: a watchdog shuts the socket at the deadline, so an upstream that drips bytes
cannot hold a request open. Redirects are not followed (they could leave the allowlist).

    url = allowed_url("http://img.example/ok/cat.png", [UrlPrefix.parse("http://img.example/ok/")])
    data = download(url, max_bytes=10 * 2**20, seconds=10.0)
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f-\x9f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# percent-encoded `.`, `/`, `\` and NUL: a server could decode them into a path outside the prefix
_ENCODED_PATH_CHARS = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)
_BAD_PERCENT = re.compile(r"%(?![0-9a-fA-F]{2})")
# characters kept as they are when the decoded path is encoded again (RFC 3986 pchar less `%`)
_PATH_SAFE = "/!$&'()*+,;=:@~-._"


class UrlRefused(ValueError):
    """The URL is not allowed; the message says why, from the URL alone."""


class FetchError(ValueError):
    """The download failed (HTTP status, connection, deadline); the message says which."""


class FetchTooLarge(FetchError):
    """The body is over `max_bytes` (a server answers 413)."""


@dataclass(frozen=True)
class ParsedUrl:
    scheme: str
    host: str
    port: int
    segments: tuple[str, ...]  # decoded path segments, in order
    query: str  # raw, as given ("" for none)

    def normalised(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == _DEFAULT_PORTS[self.scheme] else f":{self.port}"
        path = quote("/" + "/".join(self.segments), safe=_PATH_SAFE)
        return f"{self.scheme}://{host}{port}{path}" + (f"?{self.query}" if self.query else "")

    def target(self) -> str:
        """The request target sent to the host: the path and query of `normalised()`."""
        path = quote("/" + "/".join(self.segments), safe=_PATH_SAFE)
        return path + (f"?{self.query}" if self.query else "")


def parse_url(url: str, *, prefix: bool = False) -> ParsedUrl:
    """Parse and check `url`; raise UrlRefused with the reason. A `prefix` may end in `/` (its
    last segment is then empty and dropped) and may have no path segments."""
    if _CONTROL_OR_SPACE.search(url):
        raise UrlRefused("it holds a control character or a space")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UrlRefused(f"it cannot be parsed ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise UrlRefused("only http and https URLs can be fetched")
    if "@" in parts.netloc:
        raise UrlRefused("it holds user information (user@host)")
    if not parts.hostname:
        raise UrlRefused("it has no host")
    if "\\" in url:
        raise UrlRefused("it holds a backslash")
    if _BAD_PERCENT.search(url):
        raise UrlRefused("it holds a '%' that is not followed by two hex digits")
    if _ENCODED_PATH_CHARS.search(parts.path):
        raise UrlRefused("its path holds a percent-encoded '.', '/', '\\' or NUL")
    raw = parts.path or "/"
    if not raw.startswith("/"):
        raise UrlRefused("its path must start with '/'")
    try:
        segments = [unquote(s, errors="strict") for s in raw[1:].split("/")]
    except UnicodeDecodeError:
        raise UrlRefused("its path is not valid percent-encoded UTF-8") from None
    if prefix and segments[-1] == "":
        segments.pop()
    for s in segments:
        if s in ("", ".", ".."):
            raise UrlRefused("its path holds an empty, '.' or '..' segment")
        if _CONTROL.search(s):
            raise UrlRefused("its path decodes to a control character")
    return ParsedUrl(
        scheme=scheme,
        host=parts.hostname.lower(),
        port=port if port is not None else _DEFAULT_PORTS[scheme],
        segments=tuple(segments),
        query=parts.query,
    )


@dataclass(frozen=True)
class UrlPrefix:
    """One allowlist entry: scheme, host, port and leading path segments."""

    parsed: ParsedUrl
    text: str

    @classmethod
    def parse(cls, text: str) -> UrlPrefix:
        try:
            parsed = parse_url(text, prefix=True)
        except UrlRefused as e:
            raise ValueError(f"allowed URL prefix {text!r}: {e}") from None
        if parsed.query:
            raise ValueError(f"allowed URL prefix {text!r}: must not hold a query")
        return cls(parsed, text)

    def admits(self, url: ParsedUrl) -> bool:
        p, n = self.parsed, len(self.parsed.segments)
        return (
            (url.scheme, url.host, url.port) == (p.scheme, p.host, p.port)
            and url.segments[:n] == p.segments
            and len(url.segments) > n  # names something below the prefix
        )


def allowed_url(url: str, prefixes: list[UrlPrefix] | tuple[UrlPrefix, ...]) -> ParsedUrl:
    """`url` parsed and normalised if an allowed prefix admits it; else UrlRefused."""
    parsed = parse_url(url)
    if not any(p.admits(parsed) for p in prefixes):
        raise UrlRefused("it is not under an allowed URL prefix")
    return parsed


def download(url: ParsedUrl, *, max_bytes: int, seconds: float, read_timeout: float) -> bytes:
    """GET `url` (no redirects); the body, at most `max_bytes` (else FetchTooLarge), within
    `seconds` for the whole download (else FetchError). `read_timeout` bounds each wait for
    data as well."""
    if seconds <= 0:
        raise FetchError("no time was left for the download")
    end = time.monotonic() + seconds
    cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = cls(url.host, url.port, timeout=min(read_timeout, seconds))
    watchdog = threading.Timer(seconds, _shut, args=(conn,))
    watchdog.daemon = True
    watchdog.start()
    try:
        return _get(conn, url, max_bytes, end, read_timeout)
    except (OSError, http.client.HTTPException) as e:
        if time.monotonic() >= end:
            raise FetchError(f"it did not finish within {seconds:g} s") from None
        raise FetchError(f"the connection failed ({type(e).__name__}: {e})") from None
    finally:
        watchdog.cancel()
        conn.close()


def _get(
    conn: http.client.HTTPConnection, url: ParsedUrl, max_bytes: int, end: float, timeout: float
) -> bytes:
    conn.request("GET", url.target(), headers={"Accept": "image/*", "User-Agent": "sav-ray"})
    response = conn.getresponse()
    if response.status != 200:
        raise FetchError(f"HTTP {response.status}")
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise FetchTooLarge(
            f"its Content-Length is {length} bytes, over the limit of {max_bytes} bytes"
        )
    chunks, total = [], 0
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if conn.sock is not None:
            conn.sock.settimeout(min(timeout, remaining))
        chunk = response.read1(65536)
        if not chunk:
            if time.monotonic() >= end:  # the watchdog shut the socket: the body is cut short
                raise TimeoutError
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise FetchTooLarge(f"it is over the limit of {max_bytes} bytes")
        chunks.append(chunk)


def _shut(conn: http.client.HTTPConnection) -> None:
    """At the deadline: end any blocked read or write on the connection's socket."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
