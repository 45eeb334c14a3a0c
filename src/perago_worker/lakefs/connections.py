"""Keep-alive HTTP connections to one origin, one per thread, for object bodies.

Bodies are where the per-object cost is paid: a plain `http.client` connection per thread
costs about half the CPU of a pooled urllib3 request (measured: 0.29 vs 0.55 ms per 16 KiB
GET on loopback), and no connection is ever shared between threads. The same class carries
requests to lakeFS (the API data path) and to the object store (presigned URLs).

TLS and proxies follow the worker's `Network` (`perago_worker.network`), as the SDKs do:
every https connection uses its one shared `ssl.SSLContext`; through a proxy an https
origin is reached in a CONNECT tunnel (`set_tunnel`), a plain http one with absolute-form
requests. With `credentials` (lakeFS's key pair) each request carries their current Basic
header, and a 401 answered to a pair that has since changed (a rotated Secret) is sent
again with the new one.
"""

from __future__ import annotations

import errno
import http.client
import socket
import ssl
import threading
import urllib.parse
import weakref
from typing import Any

from perago_worker.credentials import Credentials
from perago_worker.network import CertificateRefused, Network, certificate_message

BLOCK = 1 << 20


class CredentialsChanged(ConnectionError):
    """A 401 to a request sent with a key pair that has been rotated since: send it again
    (a `ConnectionError`, so the retry policy does, rebuilding a streamed body)."""


class _Slot:
    """One thread's connection. The thread-local holds the only strong reference, so when the
    thread ends (a transfer pool per attempt) the slot is collected and its socket closed:
    the connection list never outlives the threads that used it."""

    __slots__ = ("__weakref__", "conn", "response")

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn: http.client.HTTPConnection | None = conn
        self.response: http.client.HTTPResponse | None = None  # the last one it answered
        weakref.finalize(self, conn.close)


# Network faults that are plain OSErrors, not ConnectionError/TimeoutError: a DNS answer that
# did not come, a route that went away. Retried like a reset (see `request`).
_NETWORK_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.ECONNABORTED}
)


def is_network_fault(exc: OSError) -> bool:
    if isinstance(exc, socket.gaierror):
        return exc.errno not in (socket.EAI_NONAME,)  # a name that does not exist is permanent
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLCertVerificationError):
        return True  # a TLS stream dropped or garbled mid-way
    if str(exc).startswith("Tunnel connection failed: 5"):
        return True  # the proxy could not reach the origin this time
    return exc.errno in _NETWORK_ERRNOS


class Connections:
    """Per-thread keep-alive connections to `origin` (scheme://host:port)."""

    def __init__(
        self,
        origin: str,
        timeout: float,
        headers: dict[str, str] | None = None,
        *,
        network: Network | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(origin)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._headers = dict(headers or {})
        self.network = network if network is not None else Network()
        self._credentials = credentials
        self._proxy = self.network.proxy_for(f"{parts.scheme}://{parts.netloc}")
        self._context = self.network.ssl_context() if self._https else None
        # Plain http through a proxy: absolute-form request targets, to this origin.
        self._absolute = "" if self._https or self._proxy is None else f"http://{parts.netloc}"
        if self._proxy is not None and not self._https:
            self._headers.update(self._proxy.headers)
        self._timeout = timeout
        self._local = threading.local()
        self._all: weakref.WeakSet[_Slot] = weakref.WeakSet()
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        slot: _Slot | None = getattr(self._local, "slot", None)
        conn = slot.conn if slot is not None else None
        if slot is not None and slot.response is not None and not slot.response.isclosed():
            # The last response was not read to its end (its reader raised): the connection
            # cannot carry another request.
            self.discard()
            conn = None
        if conn is None:
            proxy = self._proxy
            host, port = (proxy.host, proxy.port) if proxy is not None else (self._host, self._port)
            if self._https:
                conn = http.client.HTTPSConnection(
                    host, port, timeout=self._timeout, blocksize=BLOCK, context=self._context
                )
                if proxy is not None:
                    conn.set_tunnel(self._host, self._port, headers=proxy.headers)
            else:
                conn = http.client.HTTPConnection(
                    host, port, timeout=self._timeout, blocksize=BLOCK
                )
            slot = _Slot(conn)
            self._local.slot = slot
            with self._lock:
                self._all.add(slot)
        return conn

    def request(
        self, method: str, target: str, *, body: Any = None, headers: dict[str, str] | None = None
    ) -> http.client.HTTPResponse:
        """Send one request (`target` is the path and query); the caller reads the response
        to the end. A broken connection is dropped and raised as `ConnectionError`."""
        credentials = self._credentials
        if credentials is None:
            return self._send(method, target, body, headers)
        auth, version = credentials.basic_versioned()
        resp = self._send(method, target, body, {**(headers or {}), "Authorization": auth})
        if resp.status != 401:
            return resp
        credentials.reload()
        if credentials.version == version:
            return resp  # the pair sent is still the current one: a real refusal
        resp.read()
        if body is None or isinstance(body, bytes | bytearray):
            auth = credentials.basic()
            return self._send(method, target, body, {**(headers or {}), "Authorization": auth})
        raise CredentialsChanged(f"{self._host} refused a rotated key pair; sending again")

    def _send(
        self, method: str, target: str, body: Any, headers: dict[str, str] | None
    ) -> http.client.HTTPResponse:
        conn = self._connection()
        sent = {**self._headers, **(headers or {})}
        try:
            conn.request(method, self._absolute + target, body=body, headers=sent)
            response = conn.getresponse()
            self._local.slot.response = response
            return response
        except ssl.SSLCertVerificationError as exc:
            self.discard()
            where = f"{self._host}:{self._port}"
            raise CertificateRefused(certificate_message(where, str(exc))) from None
        except (http.client.HTTPException, OSError) as exc:
            self.discard()
            if isinstance(exc, http.client.HTTPException):
                # Never the request line: for a presigned URL it is a credential.
                raise ConnectionError(f"{type(exc).__name__} from {self._host}") from None
            if not isinstance(exc, ConnectionError | TimeoutError) and is_network_fault(exc):
                raise ConnectionError(f"{type(exc).__name__} from {self._host}: {exc}") from None
            raise

    def discard(self) -> None:
        """Drop this thread's connection (after an answer that leaves it unusable)."""
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is not None and slot.conn is not None:
            slot.conn.close()
            slot.conn = None

    def close(self) -> None:
        with self._lock:
            for slot in list(self._all):
                if slot.conn is not None:
                    slot.conn.close()
                    slot.conn = None
            self._all.clear()
