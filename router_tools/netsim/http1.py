"""Just enough HTTP/1.1 for the fault server: read a request (line, headers, Content-Length or
chunked body), write a response, and read a whole response from an upstream. asyncio streams only.
"""

from __future__ import annotations

import asyncio
import http
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from .errors import NetsimError

MAX_HEAD = 64 * 1024
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
                        "content-length"})


class HttpError(NetsimError):
    """A request this server cannot parse; answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path or "/"

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]], max_body: int,
                     *, until_eof: bool = False) -> bytes:
    values = {k.lower(): v for k, v in headers}
    if "chunked" in values.get("transfer-encoding", "").lower():
        return await _read_chunked(reader, max_body)
    if "content-length" in values:
        try:
            length = int(values["content-length"])
        except ValueError:
            raise HttpError(400, "invalid Content-Length") from None
        if length < 0:
            raise HttpError(400, "invalid Content-Length")
        if length > max_body:
            raise HttpError(413, f"body of {length} bytes exceeds {max_body}")
        return await reader.readexactly(length)
    if until_eof:  # no framing: the body is everything up to the close
        body = bytearray()
        while chunk := await reader.read(65536):
            body += chunk
            if len(body) > max_body:
                raise HttpError(502, f"upstream body exceeds {max_body} bytes")
        return bytes(body)
    return b""


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HttpError(400, "invalid chunk size") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(body)
        if len(body) + size > max_body:
            raise HttpError(413, f"chunked body exceeds {max_body} bytes")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError(400, "chunk not terminated by CRLF")


async def read_request(reader: asyncio.StreamReader, max_body: int) -> Optional[Request]:
    """The next request, or None when the client closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise HttpError(400, "connection closed inside the request head") from None
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"request head over {MAX_HEAD} bytes") from None
    request_line, headers = _parse_head(head[:-4])
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"malformed request line {request_line[:80]!r}")
    method, target, version = parts
    try:
        body = await _read_body(reader, headers, max_body)
    except asyncio.IncompleteReadError:
        raise HttpError(400, "connection closed inside the request body") from None
    return Request(method=method.upper(), target=target, version=version, headers=headers, body=body)


def render_response(code: int, body: bytes = b"", headers: "list[tuple[str, str]] | tuple" = (),
                    *, keep_alive: bool = True, content_length: Optional[int] = None) -> bytes:
    try:
        reason = http.HTTPStatus(code).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {code} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in HOP_BY_HOP]
    lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


async def read_response(reader: asyncio.StreamReader, max_body: int, *, method: str = "GET") -> Response:
    """A whole response from an upstream asked with ``Connection: close``."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, headers = _parse_head(head[:-4])
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise HttpError(502, f"malformed upstream status line {status_line[:80]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise HttpError(502, f"malformed upstream status line {status_line[:80]!r}") from None
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        body = b""
    else:
        body = await _read_body(reader, headers, max_body, until_eof=True)
    return Response(status=status, headers=headers, body=body)


def render_request(method: str, target: str, host: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() != "host"]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
