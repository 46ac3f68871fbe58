"""What sftlab's local servers (`sftlab ui`, `sftlab serve`) check before they act on a request.

They run on a workstation next to a web browser, so a hostile page can send them requests: a
cross-site "simple" POST (text/plain, no preflight), or a DNS-rebinding script whose requests
carry the attacker's host name. The checks:

    | check                 | refused when                                                        |
    |-----------------------|---------------------------------------------------------------------|
    | Host                  | the Host header is not an allowed name (loopback names on loopback; |
    |                       | the --host value and --allowed-host names elsewhere), or not the    |
    |                       | bound port                                                          |
    | Origin / Referer      | a state-changing request comes from another origin (`null` too)     |
    | content type          | a state-changing request's body is not application/json             |
    | body                  | larger than the limit, slower than the read timeout, nested deeper  |
    |                       | than the limit, or holding a lone surrogate                         |
    | headers               | a connection that has not sent a whole request head in time         |

A refusal is answered before anything happens; the apps turn `GuardError` into their own JSON
error shape.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
MAX_REQUEST_MB = 8.0  # an agent request with many tools and deep schemas is well under this
READ_TIMEOUT_S = 30.0  # to send a request's head, and again its body
MAX_JSON_DEPTH = 64  # JSON schemas of tools nest a dozen levels deep


class GuardError(Exception):
    def __init__(self, status: int, message: str, code: str = "forbidden"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def split_host(value: str) -> tuple[str, int | None]:
    """'127.0.0.1:7860' -> ('127.0.0.1', 7860); '[::1]:80' -> ('::1', 80); 'localhost' -> ('localhost', None)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name, port = value, ""
    try:
        return name, int(port) if port else None
    except ValueError:
        return name, -1  # not a port: matches no bound port


@dataclass
class Guard:
    """The names a server answers to, and the origins whose pages may change things."""

    names: set[str]
    port: int | None = None  # the bound port (None: not known yet, any port)
    cors_origins: set[str] = field(default_factory=set)  # other origins let in (serve --cors-origin)

    @classmethod
    def for_binding(cls, host: str, port: int | None = None, allowed_hosts=(), cors_origins=()) -> Guard:
        """Loopback names on loopback (and on an any-address bind, beside the allowed hosts); else
        the bound host and the --allowed-host names."""
        host = host.strip().strip("[]").lower()
        names = {n.strip().strip("[]").lower() for n in allowed_hosts if n.strip()}
        if host in LOOPBACK_NAMES or host in ANY_ADDRESS:
            names |= set(LOOPBACK_NAMES)
        if host not in ANY_ADDRESS:
            names.add(host)
        return cls(names, port or None, {o.rstrip("/").lower() for o in cors_origins})

    def host_ok(self, header: str | None) -> bool:
        if not header:
            return False
        name, port = split_host(header)
        if name not in self.names or port == -1:
            return False
        return self.port is None or port is None or port == self.port  # no port: a client that is not a browser

    def own_origin(self, origin: str) -> bool:
        """An origin (scheme://host[:port]) of this server itself."""
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False
        name, port = split_host(parts.netloc)
        if name not in self.names or port == -1 or "@" in parts.netloc:
            return False
        default = 443 if parts.scheme == "https" else 80
        return self.port is None or (port or default) == self.port

    def origin_ok(self, origin: str | None, referer: str | None) -> bool:
        """A state-changing request's Origin (else Referer) is this server's, or a CORS origin let in;
        neither header (a client that is not a browser) is accepted."""
        if origin is not None:
            origin = origin.strip().rstrip("/").lower()
            return origin != "null" and (self.own_origin(origin) or origin in self.cors_origins)
        if referer:
            parts = urlsplit(referer.strip())
            source = f"{parts.scheme}://{parts.netloc}".lower()
            return self.own_origin(source) or source in self.cors_origins
        return True

    def check(self, method: str, headers, *, json_body: bool = True) -> None:
        """GuardError unless the request may go on (Host always; Origin and content type when it
        changes things)."""
        if not self.host_ok(headers.get("host")):
            allowed = ", ".join(sorted(self.names)) + (f" (port {self.port})" if self.port else "")
            raise GuardError(403, f"Host {headers.get('host')!r} is not a name this server answers to ({allowed}); "
                                  "start it with --allowed-host NAME to let another name in", "host_not_allowed")
        if method.upper() in SAFE_METHODS:
            return
        if not self.origin_ok(headers.get("origin"), headers.get("referer")):
            source = headers.get("origin") or headers.get("referer")
            raise GuardError(403, f"a request from another origin ({source}) may not change anything here",
                             "cross_origin")
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if json_body and kind != "application/json":
            raise GuardError(403, f"send the request as Content-Type: application/json (got {kind or 'none'!r})",
                             "content_type")


async def read_body(request, max_bytes: int, timeout_s: float = READ_TIMEOUT_S) -> bytes:
    """The request body, refused past `max_bytes` (413) or `timeout_s` (408) without reading on."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise GuardError(400, "the Content-Length header is not a number", "invalid_request") from None
        if size > max_bytes:
            raise GuardError(413, _too_large(size, max_bytes), "request_too_large")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise GuardError(413, _too_large(size, max_bytes), "request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise GuardError(408, f"the request body did not arrive within {timeout_s:g} s", "request_timeout") from None


def _too_large(size: int, limit: int) -> str:
    return (f"the request body is {size / 2**20:.2f} MB, over this server's limit of {limit / 2**20:.3g} MB "
            "(start it with a larger --max-request-mb to allow it)")


def parse_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH):
    """JSON text -> value, refusing invalid UTF-8 or JSON, nesting deeper than `max_depth` and
    strings with a lone surrogate (which nothing downstream can encode) with a 400."""
    try:
        value = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise GuardError(400, f"the request body is not valid JSON: {str(exc)[:200]}", "invalid_json") from None
    except RecursionError:
        raise GuardError(400, f"the request body nests deeper than {max_depth} levels", "invalid_json") from None
    check_json(value, max_depth)
    return value


def check_json(value, max_depth: int = MAX_JSON_DEPTH) -> None:
    stack = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise GuardError(400, f"the request body holds a string with a lone surrogate at {where or 'the top'} "
                                      "(not valid Unicode)", "invalid_json") from None
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > max_depth:
            raise GuardError(400, f"the request body nests deeper than {max_depth} levels (at {where})", "invalid_json")
        entries = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in entries:
            if isinstance(key, str):
                stack.append((key, depth, where))
            stack.append((child, depth + 1, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]"))


# -- the connection layer: a request head must arrive in time ----------------------------------

def timed_http_protocol(header_timeout_s: float = READ_TIMEOUT_S):
    """uvicorn's h11 protocol that closes a connection which has not sent a whole request head
    within `header_timeout_s` (uvicorn times out only idle keep-alive connections)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def connection_lost(self, exc) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return TimedH11Protocol
