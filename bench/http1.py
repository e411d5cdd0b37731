"""A minimal HTTP/1.1 keep-alive client over asyncio streams, for benchmarks that share the CPU with the service.

On a small machine the load generator competes with the service it measures: httpx spends more CPU per request
than the service's own request handling, so the numbers measured it rather than the service. This client writes
one request and reads one response (``Content-Length`` bodies only) per call on one persistent connection, and
reconnects after an error or a ``Connection: close``. It is not a general client: no TLS, redirects, chunked
bodies, pipelining or timeouts beyond the caller's own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Connection:
    """One keep-alive connection to ``base_url`` (http://host:port); use one per concurrent client."""

    def __init__(self, base_url: str):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http://host[:port] URLs are supported, not {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self._host_header = parts.netloc
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes = b"", content_type: str = "application/json") -> Response:
        """Send one request and read its whole response; raises OSError or asyncio.IncompleteReadError if the
        connection fails (the next call reconnects)."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"{method} {path} HTTP/1.1", f"host: {self._host_header}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines += [f"content-type: {content_type}", f"content-length: {len(body)}"]
        try:
            self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            response, keep_alive = await self._read_response()
        except BaseException:
            self.close()
            raise
        if not keep_alive:
            self.close()
        return response

    async def _read_response(self) -> tuple[Response, bool]:
        assert self._reader is not None
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length, keep_alive = 0, True
        for line in header_lines:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise OSError(f"unsupported transfer-encoding {value.strip().decode()!r} (Content-Length only)")
            elif name == b"connection" and value.strip().lower() == b"close":
                keep_alive = False
        body = await self._reader.readexactly(length) if length else b""
        return Response(status, body), keep_alive

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
