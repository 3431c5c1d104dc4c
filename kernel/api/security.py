"""Who may drive the API: the bearer token (from the environment or the data dir's token file)
and the checks that keep a web browser out.

The threats and the answer to each (the README's "Security model" says the same to users):

* **A web page** the user visits (CSRF) can make the browser send requests to 127.0.0.1; **DNS
  rebinding** lets a page on a name it controls reach 127.0.0.1 as "its own" origin. A browser
  always marks such requests: :func:`refusal` refuses a cross-site ``Origin`` or
  ``Sec-Fetch-Site``, a ``Host`` that is not this server's (on a loopback bind), and a body that
  is not ``application/json`` (the types a page may send without a CORS preflight are
  ``text/plain``, forms and multipart; the API answers no preflight and sends no CORS headers).
* **Other local users** can reach 127.0.0.1 too: the API demands a bearer token even on
  loopback. It is read from the variable named by ``[server] token_env`` if set, else from the
  token file ``<data_dir>/api.token`` (mode 0600, created at start, kept across restarts), which
  the CLI client and the TUI read on their own.
* **Other hosts** reach only a non-loopback bind, which needs a token from the environment.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from kernel.errors import ErrorCode
from kernel.files import atomic_write

TOKEN_FILE = "api.token"
"""The token file's name in the data dir."""

_JSON = "application/json"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TOKEN_BYTES = 32


@functools.lru_cache(maxsize=64)
def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the API on this machine (memoised: it is asked for the
    same bind host on every request)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name (or "" = every address): treat it as reachable


def _host_name(host_header: str) -> str:
    """The host of a ``Host`` header value: ``[::1]:8765`` -> ``::1``, ``a:80`` -> ``a``."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h[1:]
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def loopback_name(host: str) -> bool:
    """A name or address that always means this machine (``localhost``, ``*.localhost``,
    127.0.0.0/8, ``::1``): no DNS answer can point it elsewhere."""
    return host == "localhost" or host.endswith(".localhost") or is_loopback(host)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused before it reaches a handler: status, code and message."""

    status: int
    code: ErrorCode
    message: str


def refusal(method: str, headers: Mapping[str, str], *, has_body: bool,
            bind_host: str) -> Refusal | None:
    """The reason to refuse a request that a web browser, not a client of ours, sent; or None.

    ``bind_host`` is ``[server] host``: on a loopback bind the ``Host`` header must name this
    machine (``localhost``, a loopback address, or the bind host itself), which defeats DNS
    rebinding. On a non-loopback bind any ``Host`` may be legitimate (a name in the user's
    DNS); a bearer token is mandatory there, and a browser never sends one on its own.
    """
    host_header = headers.get("Host", "")
    host = _host_name(host_header)
    if is_loopback(bind_host) and not (loopback_name(host) or host == bind_host.lower()):
        return Refusal(403, ErrorCode.ERR_FORBIDDEN_ORIGIN,
                       f"Host {host_header!r} is not this kernel's address: the API is bound "
                       f"to {bind_host}, so only localhost or a loopback address is accepted "
                       "(a foreign Host is how DNS rebinding reaches a local service)")
    site = headers.get("Sec-Fetch-Site", "").strip().lower()
    if site in ("cross-site", "same-site"):
        return Refusal(403, ErrorCode.ERR_FORBIDDEN_ORIGIN,
                       f"a request from a web page (Sec-Fetch-Site: {site}) is refused: the "
                       "API serves local clients (the CLI, the TUI, scripts), not browsers")
    origin = headers.get("Origin")
    if origin is not None and not _same_origin(origin, host_header):
        return Refusal(403, ErrorCode.ERR_FORBIDDEN_ORIGIN,
                       f"a request from the web origin {origin!r} is refused: the API serves "
                       "local clients (the CLI, the TUI, scripts), not browsers, and sends no "
                       "CORS headers")
    if method not in _SAFE_METHODS and has_body:
        ctype = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if ctype != _JSON:
            return Refusal(415, ErrorCode.ERR_UNSUPPORTED_MEDIA_TYPE,
                           f"the body must be JSON sent with 'Content-Type: {_JSON}', not "
                           f"{ctype or 'no Content-Type'!r}")
    if has_body:
        coding = headers.get("Content-Encoding", "").strip().lower()
        if coding not in ("", "identity"):
            # the server never inflates a body (a small gzip bomb would stall the loop, even
            # for a client without the token): an encoded body is refused unread
            return Refusal(415, ErrorCode.ERR_UNSUPPORTED_MEDIA_TYPE,
                           f"the body must be plain JSON, not compressed (Content-Encoding: "
                           f"{coding!r}); send it without a Content-Encoding")
    return None


def _same_origin(origin: str, host_header: str) -> bool:
    """Whether ``Origin`` is this server itself (``http://<Host>``; it serves no TLS): never
    true for "null"."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    return (parts.scheme == "http" and bool(parts.netloc)
            and parts.netloc.lower() == host_header.strip().lower()
            and not parts.path.strip("/") and not parts.query)


# ================================================================================ token file


def token_path(data_dir: Path) -> Path:
    return data_dir / TOKEN_FILE


def read_token(path: Path) -> str | None:
    """The token in ``path``, or ``None`` if it is missing, empty or unreadable (for clients)."""
    try:
        text = path.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def load_or_create_token(path: Path) -> tuple[str, str]:
    """The kernel's token: the one in ``path`` if that file is ours and private, else a new
    one written there (mode 0600, atomically). Returns ``(token, what_happened)``.

    A file that is a symlink, belongs to another user, can be read by group or others, or
    holds no token is replaced: a token others may have read is no secret.

    :raises OSError: the data dir cannot be created or written.
    """
    why = "created"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        fd = -1
    except OSError:  # a symlink (ELOOP) or unreadable: replace it
        fd = -1
        why = "replaced (it was a symlink or unreadable)"
    if fd >= 0:
        try:
            st = os.fstat(fd)
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read(4096)
        finally:
            os.close(fd)
        token = raw.decode("utf-8", "replace").strip()
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            why = "replaced (it belonged to another user or was not a file)"
        elif st.st_mode & 0o077:
            why = f"replaced (its mode was {stat.S_IMODE(st.st_mode):04o}, readable by others)"
        elif len(token) < 16 or not token.isprintable():
            why = "replaced (it held no usable token)"
        else:
            return token, "kept"
    # hex, never a leading "-": a token is typed after --token on command lines
    token = secrets.token_hex(_TOKEN_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, (token + "\n").encode(), mode=0o600)  # replaces a symlink, not its target
    return token, why
