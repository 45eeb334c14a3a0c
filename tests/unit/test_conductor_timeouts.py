"""The SDK's own token requests are bounded by `conductor.request_timeout_seconds`.

conductor-python sends `POST /token` from private methods (`ApiClient.__get_new_token`)
without a `_request_timeout`, so it waits as long as the httpx client's default allows (the
SDK's is 120 s). A Conductor that accepts the connection and never answers stands in for a
hung server: a listening socket on 127.0.0.1 that reads each request and sends nothing.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from perago_worker.conductor import Conductor

T = TypeVar("T")
TIMEOUT = 0.5
# Far below the SDK's 120 s default, far above TIMEOUT on a busy machine.
GIVE_UP_BY = TIMEOUT + 4.0


class SilentServer:
    """Accepts connections, records each request line, never answers."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.requests: list[str] = []
        self._connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = connection.recv(4096)
                if not chunk:
                    return
                data += chunk
        except OSError:
            return
        self.requests.append(data.split(b"\r\n", 1)[0].decode())

    def close(self) -> None:
        self._listener.close()
        for connection in self._connections:
            connection.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def _timed(action: Callable[[], T]) -> tuple[T, float]:
    """What `action` returned and how long it ran; fails (without waiting for it) if it
    runs past GIVE_UP_BY."""
    returned: list[T] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: returned.append(action()), daemon=True)
    thread.start()
    thread.join(GIVE_UP_BY)
    assert returned, f"still waiting for Conductor after {GIVE_UP_BY} s"
    return returned[0], time.monotonic() - started


def _conductor(url: str) -> Conductor:
    """A Conductor client on `url`; its first token request (sent by the SDK when the
    client is built) must give up in time too, or the test would wait 120 s to fail."""
    conductor, _ = _timed(
        lambda: Conductor(url, auth_key="key", auth_secret="secret", request_timeout=TIMEOUT)
    )
    return conductor


def test_the_token_request_at_start_gives_up_after_the_request_timeout(
    silent: SilentServer,
) -> None:
    _, taken = _timed(
        lambda: Conductor(silent.url, auth_key="key", auth_secret="secret", request_timeout=TIMEOUT)
    )

    assert silent.requests == ["POST /api/token HTTP/1.1"]
    assert taken >= TIMEOUT * 0.9  # it waited for the answer: the timeout ended it


def test_a_forced_token_refresh_after_a_401_gives_up_after_the_request_timeout(
    silent: SilentServer,
) -> None:
    conductor = _conductor(silent.url)  # its first token request timed out already

    refreshed, taken = _timed(conductor._client.force_refresh_auth_token)

    assert silent.requests == ["POST /api/token HTTP/1.1"] * 2
    assert refreshed is False
    assert taken >= TIMEOUT * 0.9


def test_the_client_rebuilt_after_a_broken_connection_keeps_the_request_timeout(
    silent: SilentServer,
) -> None:
    conductor = _conductor(silent.url)
    conductor._client.rest_client._reset_connection()

    refreshed, taken = _timed(conductor._client.force_refresh_auth_token)

    assert silent.requests[-1] == "POST /api/token HTTP/1.1"
    assert refreshed is False
    assert taken >= TIMEOUT * 0.9
