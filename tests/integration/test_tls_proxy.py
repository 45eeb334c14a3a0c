"""TLS, proxies and credentials, proven on real servers with the clients `compose.clients` builds.

- A real lakeFS serving TLS itself, on a real S3 store (VersityGW) serving TLS too, both
  with a certificate signed by a CA this module makes (openssl): with `tls.ca_bundle` every
  plane works (control plane, listing, upload and download, through lakeFS and presigned
  to the store); without it each refuses the certificate with one clear error, at once;
  with `tls.verify: false` they work again.
- Conductor behind a TLS terminator written here (Conductor OSS serving TLS itself would
  need a keystore and a JVM restart; the terminator is a real TLS endpoint, and what is
  tested is the worker's httpx client), which may also require a client certificate
  (mutual TLS, `tls.client_cert` / `tls.client_key`), as may one in front of lakeFS.
- A forwarding proxy written here (CONNECT tunnels and absolute-form requests, with proxy
  credentials): with `HTTPS_PROXY` / `HTTP_PROXY` set every client goes through it, and a
  `NO_PROXY` match goes direct (counted by what the proxy saw).
- Conductor's token auth (Orkes-style `POST /api/token`, `X-Authorization`) against a
  gateway written here in front of the real Conductor: requests carry the token, a 401
  renews it, a rotated secret file is what the next token request sends.
- lakeFS credentials read from files and rotated without a restart: a second key pair is
  made for the admin user, the files rewritten, the first pair deleted; the client's next
  calls succeed, control plane and data plane.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from perago_testing import make_settings
from perago_worker.compose import clients
from perago_worker.conductor import Conductor, ConductorError
from perago_worker.devstack import tools
from perago_worker.devstack.servers import (
    DEV_ACCESS_KEY_ID,
    DEV_SECRET_ACCESS_KEY,
    STORE_ACCESS_KEY_ID,
    STORE_SECRET_ACCESS_KEY,
    Endpoints,
    ServerProcess,
    StoreEndpoint,
    free_port,
    lakefs_server,
    object_store_server,
)
from perago_worker.lakefs import LakeFS, LakeFSError, Unauthorized
from perago_worker.lakefs.connections import Connections
from perago_worker.lakefs.presigned import SMALL_UPLOAD_BYTES
from perago_worker.network import CertificateRefused
from perago_worker.settings import ConductorSettings, LakeFSSettings, Settings, TLSSettings

pytestmark = pytest.mark.integration

ADMIN = "perago-admin"  # the devstack's installation user

# -- a CA and its certificates (openssl) ---------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=perago test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return folder / f"{name}.pem", folder / f"{name}.key"


def _issue(folder: Path, name: str, cn: str, usage: str, san: str | None) -> tuple[Path, Path]:
    ext = folder / f"{name}.ext"
    lines = [
        "basicConstraints=CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={usage}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid,issuer",
    ]
    if san:
        lines.append(f"subjectAltName={san}")
    ext.write_text("\n".join(lines) + "\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", ext.name,
        cwd=folder,
    )  # fmt: skip
    return folder / f"{name}.pem", folder / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, _ = _make_ca(folder, "ca")
    server = _issue(folder, "server", "127.0.0.1", "serverAuth", "IP:127.0.0.1,DNS:localhost")
    client = _issue(folder, "client", "perago-worker", "clientAuth", None)
    other, _ = _make_ca(folder, "other")
    return Pki(ca, *server, *client, other)


# -- a TLS lakeFS on a TLS object store --------------------------------------------------------


def _https_ok(url: str, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    parts = urllib.parse.urlsplit(url)
    try:
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=2, context=context)
        conn.request("GET", parts.path or "/")
        status = conn.getresponse().status
        conn.close()
    except OSError:
        return False
    return status < 500


@dataclass
class TlsStack:
    lakefs_url: str
    store_url: str
    servers: list[ServerProcess]


@pytest.fixture(scope="module")
def tls_stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    """VersityGW and lakeFS, each serving TLS with the module CA's certificate. lakeFS's
    auth cache is off, so a deleted key pair is refused at once."""
    workdir = tmp_path_factory.mktemp("tls-stack")
    store_port, lakefs_port = free_port(), free_port()
    store = object_store_server(workdir, store_port, tools.versitygw_binary())
    at = store.cmd.index("posix")
    store.cmd[at:at] = ["--cert", str(pki.server_cert), "--key", str(pki.server_key)]
    store_url = f"https://127.0.0.1:{store_port}"
    store.ready = lambda: _https_ok(store_url + "/", pki.ca)
    lakefs = lakefs_server(
        workdir,
        lakefs_port,
        tools.lakefs_binaries().lakefs,
        store=StoreEndpoint(store_url, STORE_ACCESS_KEY_ID, STORE_SECRET_ACCESS_KEY),
        name="lakefs-tls",
        extra_env={
            "LAKEFS_TLS_ENABLED": "true",
            "LAKEFS_TLS_CERT_FILE": str(pki.server_cert),
            "LAKEFS_TLS_KEY_FILE": str(pki.server_key),
            "AWS_CA_BUNDLE": str(pki.ca),  # lakeFS's S3 client trusts the module CA
            "LAKEFS_AUTH_CACHE_ENABLED": "false",
        },
    )
    lakefs_url = f"https://127.0.0.1:{lakefs_port}"
    lakefs.ready = lambda: _https_ok(lakefs_url + "/api/v1/healthcheck", pki.ca)
    servers = [store, lakefs]
    try:
        for server in servers:
            server.start()
            server.wait_ready(120)
        yield TlsStack(lakefs_url, store_url, servers)
    finally:
        for server in reversed(servers):
            server.stop()


# -- a TLS terminator (optionally requiring a client certificate) ---------------------------------


class TlsTerminator:
    """Accepts TLS on loopback and relays the plain bytes to `backend` (host, port)."""

    def __init__(self, pki: Pki, backend: tuple[str, int], *, require_client: bool = False):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        if require_client:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(str(pki.ca))
        self.backend = backend
        self.peers: list[str] = []  # the client certificates' common names
        self.handshakes_failed = 0
        terminator = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                terminator._serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _serve(self, raw: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshakes_failed += 1
            return
        peer = tls.getpeercert()
        if peer:
            self.peers.append(dict(x[0] for x in peer["subject"])["commonName"])
        with tls, socket.create_connection(self.backend) as plain:
            _pump(tls, plain)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Relay bytes both ways until either side ends (TLS-buffered bytes included)."""
    while True:
        ready = [s for s in (a, b) if isinstance(s, ssl.SSLSocket) and s.pending()]
        if not ready:
            ready, _, _ = select.select([a, b], [], [], 60)
        if not ready:
            return
        for sock in ready:
            try:
                data = sock.recv(1 << 16)
            except ssl.SSLWantReadError:
                continue
            except OSError:
                return
            if not data:
                return
            (b if sock is a else a).sendall(data)


def _backend(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


# -- a forwarding proxy -------------------------------------------------------------------------

HOP_BY_HOP = {
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}


class ForwardingProxy:
    """An HTTP proxy: CONNECT tunnels for https targets, absolute-form requests forwarded
    for http ones. Requires `user:password`; counts what it carried per (method, host:port)."""

    def __init__(self, user: str = "proxy-user", password: str = "proxy-pass") -> None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.expected = f"Basic {token}"
        self.user, self.password = user, password
        self.seen: Counter[tuple[str, str]] = Counter()
        self.refused = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _authorized(self) -> bool:
                if self.headers.get("Proxy-Authorization") == proxy.expected:
                    return True
                with proxy.lock:
                    proxy.refused += 1
                self.send_response(407)
                self.send_header("Proxy-Authenticate", 'Basic realm="test"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return False

            def do_CONNECT(self) -> None:
                if not self._authorized():
                    return
                with proxy.lock:
                    proxy.seen["CONNECT", self.path] += 1
                host, _, port = self.path.rpartition(":")
                try:
                    upstream = socket.create_connection((host, int(port)), timeout=10)
                except OSError:
                    self.send_error(502)
                    return
                self.send_response(200, "Connection established")
                self.end_headers()
                self.wfile.flush()
                with upstream:
                    upstream.settimeout(None)
                    _pump(self.connection, upstream)
                self.close_connection = True

            def _forward(self) -> None:
                if not self._authorized():
                    return
                target = urllib.parse.urlsplit(self.path)
                if target.scheme != "http" or not target.netloc:
                    self.send_error(400, "absolute-form http URL expected")
                    return
                with proxy.lock:
                    proxy.seen[self.command, target.netloc] += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = http.client.HTTPConnection(
                    target.hostname, target.port or 80, timeout=30
                )
                path = target.path + (f"?{target.query}" if target.query else "")
                upstream.request(self.command, path or "/", body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self.lock:
            self.seen.clear()
            self.refused = 0

    def hosts(self, method: str | None = None) -> set[str]:
        return {h for (m, h) in self.seen if method is None or m == method}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- Conductor token auth (Orkes-style) in front of the real Conductor ----------------------------


class TokenGateway:
    """`POST /api/token` with keyId/keySecret answers a token; every other request must
    carry a live one in `X-Authorization` (else 401) and is then relayed to Conductor."""

    def __init__(self, conductor_url: str, key: str, secret: str) -> None:
        self.backend = urllib.parse.urlsplit(conductor_url)
        self.secrets = {key: secret}
        self.tokens: set[str] = set()
        self.expired: set[str] = set()
        self.plain_401: set[str] = set()  # revoked tokens answered 401 without an error code
        self.issued: list[str] = []  # tokens, in the order handed out
        self.log: list[tuple[str, str, int]] = []  # (path, token sent, status answered)
        self.lock = threading.Lock()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                token = self.headers.get("X-Authorization", "")
                path = self.path.split("?")[0]
                if path == "/api/token" and self.command == "POST":
                    creds = json.loads(body or b"{}")
                    with gateway.lock:
                        ok = gateway.secrets.get(creds.get("keyId")) == creds.get("keySecret")
                        issued = f"tok-{uuid.uuid4().hex[:12]}" if ok else ""
                        if ok:
                            gateway.tokens.add(issued)
                            gateway.issued.append(issued)
                        gateway.log.append((path, token, 200 if ok else 401))
                    if not ok:
                        self._answer(401, b'{"error":"INVALID_CREDENTIALS"}')
                        return
                    self._answer(200, json.dumps({"token": issued}).encode())
                    return
                with gateway.lock:
                    if token in gateway.expired:
                        status, answer = 401, b'{"error":"EXPIRED_TOKEN","message":"expired"}'
                    elif token in gateway.plain_401:
                        status, answer = 401, b'{"message":"unauthorized"}'
                    elif token not in gateway.tokens:
                        status, answer = 401, b'{"error":"INVALID_TOKEN","message":"no token"}'
                    else:
                        status, answer = 0, b""
                    gateway.log.append((path, token, status or 200))
                if status:
                    self._answer(status, answer)
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in HOP_BY_HOP and k.lower() not in ("host", "x-authorization")
                }
                upstream = http.client.HTTPConnection(
                    gateway.backend.hostname, gateway.backend.port, timeout=30
                )
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                upstream.close()
                self._answer(resp.status, data, resp.getheader("Content-Type") or "text/plain")

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api"

    def expire_all(self, *, plain: bool = False) -> None:
        with self.lock:
            (self.plain_401 if plain else self.expired).update(self.tokens)
            self.tokens.clear()

    def api_calls(self) -> list[tuple[str, str, int]]:
        with self.lock:
            return [entry for entry in self.log if entry[0] != "/api/token"]

    def token_requests(self) -> int:
        with self.lock:
            return sum(1 for entry in self.log if entry[0] == "/api/token")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- helpers ------------------------------------------------------------------------------------


def _settings(tmp_path: Path, lakefs_url: str, conductor_url: str, **overrides: Any) -> Settings:
    lakefs_fields: dict[str, Any] = {
        "endpoint": lakefs_url,
        "access_key_id": DEV_ACCESS_KEY_ID,
        "secret_access_key": DEV_SECRET_ACCESS_KEY,
        "request_timeout_seconds": 20,
        **overrides.pop("lakefs", {}),
    }
    endpoints = Endpoints(lakefs_url, "", "", conductor_url)
    return make_settings(
        endpoints,
        tmp_path / "scratch",
        lakefs=LakeFSSettings(**lakefs_fields),
        conductor=ConductorSettings(url=conductor_url, **overrides.pop("conductor", {})),
        **overrides,
    )


def _round_trip(lakefs: LakeFS, repo: str, tmp_path: Path, tag: str) -> None:
    """Every plane once: a control-plane call, an upload, a listing, a download, a commit."""
    transfers = lakefs.transfers
    branch = f"b-{tag}"
    lakefs.create_branch(repo, branch, "main", hidden=False)
    source = tmp_path / f"{tag}.bin"
    # At the presigned path's threshold: a presigned PUT (smaller files go through the API).
    payload = os.urandom(SMALL_UPLOAD_BYTES) + tag.encode()
    source.write_bytes(payload)
    key = f"data/{tag}.bin"
    fd = os.open(source, os.O_RDONLY)
    try:
        transfers.upload(repo, branch, key, fd, len(payload))
    finally:
        os.close(fd)
    listed = [o for page in transfers.list_objects(repo, branch, "data/") for o in page]
    obj = next(o for o in listed if o.key == key)
    assert obj.size == len(payload)
    dest = tmp_path / f"{tag}.out"
    transfers.download(repo, branch, obj, dest)
    assert dest.read_bytes() == payload
    commit = lakefs.commit(repo, branch, f"tls/proxy {tag}", {"tag": tag})
    assert lakefs.get_commit(repo, commit.id).metadata["tag"] == tag


def _every_client(settings: Settings, tmp_path: Path, hint: str, tag: str) -> None:
    """The worker's clients for `settings`: every lakeFS plane once, and Conductor."""
    lakefs, conductor = clients(settings)
    try:
        _round_trip(lakefs, _repo(lakefs, hint), tmp_path, tag)
        assert isinstance(conductor.get_task_defs(), list)
    finally:
        lakefs.close()


def _repo(lakefs: LakeFS, hint: str) -> str:
    name = f"{hint}-{uuid.uuid4().hex[:8]}"
    lakefs.create_repository(name)
    return name


@pytest.fixture(scope="module")
def conductor_tls(pki: Pki, endpoints: Endpoints) -> Iterator[TlsTerminator]:
    relay = TlsTerminator(pki, _backend(endpoints.conductor_url))
    yield relay
    relay.close()


# -- (a) TLS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_path", ["api", "presign"])
def test_with_the_ca_bundle_every_client_and_plane_succeeds(
    tls_stack: TlsStack, conductor_tls: TlsTerminator, pki: Pki, tmp_path: Path, data_path: str
) -> None:
    settings = _settings(
        tmp_path,
        tls_stack.lakefs_url,
        conductor_tls.url + "/api",
        lakefs={"data_path": data_path},
        tls=TLSSettings(ca_bundle=pki.ca),
    )
    lakefs, conductor = clients(settings)
    try:
        storage = lakefs.storage_config()  # the SDK, over TLS
        assert storage.blockstore_type == "s3" and storage.pre_sign_support
        assert lakefs.transfers.mode == data_path
        repo = _repo(lakefs, f"tls-{data_path}")
        _round_trip(lakefs, repo, tmp_path, data_path)
        if data_path == "presign":
            pages = list(lakefs.transfers.list_objects(repo, "b-presign", "data/"))
            assert pages[0][0].physical_address.startswith(tls_stack.store_url + "/")
        assert isinstance(conductor.get_task_defs(), list)  # httpx, over TLS
    finally:
        lakefs.close()


def test_without_the_ca_bundle_every_client_refuses_the_certificate_at_once(
    tls_stack: TlsStack, conductor_tls: TlsTerminator, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, tls_stack.lakefs_url, conductor_tls.url + "/api")
    lakefs, conductor = clients(settings)
    started = time.monotonic()
    with pytest.raises(LakeFSError) as sdk:
        lakefs.storage_config()
    with pytest.raises(CertificateRefused) as data_plane:
        next(iter(lakefs.api.list_objects("any", "main", "")))
    with pytest.raises(ConductorError) as conductor_error:
        conductor.get_task_defs()
    store = Connections(tls_stack.store_url, 10, network=lakefs.network)
    with pytest.raises(CertificateRefused) as store_error:
        store.request("GET", "/")
    assert time.monotonic() - started < 10, "a refused certificate is not retried"
    for error in (sdk.value, data_plane.value, conductor_error.value, store_error.value):
        text = str(error)
        assert "is not trusted (unable to get local issuer certificate)" in text, text
        assert "tls.ca_bundle" in text
    assert f"of {tls_stack.lakefs_url}" in str(sdk.value)
    assert f"of 127.0.0.1:{urllib.parse.urlsplit(tls_stack.lakefs_url).port}" in str(
        data_plane.value
    )
    lakefs.close()


def test_a_ca_bundle_of_another_ca_is_refused_too(
    tls_stack: TlsStack, pki: Pki, tmp_path: Path
) -> None:
    settings = _settings(
        tmp_path,
        tls_stack.lakefs_url,
        "http://127.0.0.1:9/api",
        tls=TLSSettings(ca_bundle=pki.other_ca),
    )
    lakefs, _ = clients(settings)
    with pytest.raises(LakeFSError, match="is not trusted"):
        lakefs.storage_config()
    lakefs.close()


def test_with_verify_off_every_client_accepts_the_certificate(
    tls_stack: TlsStack, conductor_tls: TlsTerminator, tmp_path: Path
) -> None:
    settings = _settings(
        tmp_path,
        tls_stack.lakefs_url,
        conductor_tls.url + "/api",
        lakefs={"data_path": "presign"},
        tls=TLSSettings(verify=False),
    )
    _every_client(settings, tmp_path, "tls-noverify", "noverify")


def test_mutual_tls_presents_the_client_certificate_to_every_client(
    pki: Pki, endpoints: Endpoints, tmp_path: Path
) -> None:
    """Terminators requiring a client certificate in front of the session's lakeFS and
    Conductor: with `tls.client_cert`/`client_key` the SDK, the data plane and Conductor
    present it; without, the handshake fails."""
    lakefs_mtls = TlsTerminator(pki, _backend(endpoints.lakefs_url), require_client=True)
    conductor_mtls = TlsTerminator(pki, _backend(endpoints.conductor_url), require_client=True)
    try:
        settings = _settings(
            tmp_path,
            lakefs_mtls.url,
            conductor_mtls.url + "/api",
            lakefs={
                "data_path": "api",
                "access_key_id": endpoints.lakefs_access_key_id,
                "secret_access_key": endpoints.lakefs_secret_access_key,
            },
            tls=TLSSettings(
                ca_bundle=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key
            ),
        )
        _every_client(settings, tmp_path, "mtls", "mtls")
        assert lakefs_mtls.peers and set(lakefs_mtls.peers) == {"perago-worker"}
        assert conductor_mtls.peers and set(conductor_mtls.peers) == {"perago-worker"}

        without = settings.model_copy(update={"tls": TLSSettings(ca_bundle=pki.ca)})
        lakefs2, conductor2 = clients(without)
        before = lakefs_mtls.handshakes_failed
        with pytest.raises((LakeFSError, OSError)):
            lakefs2.api.json("GET", "/api/v1/healthcheck", ok=(200, 204))
        with pytest.raises(ConductorError):
            conductor2.call(conductor2.metadata.get_task_defs, retry_seconds=0.1)
        assert lakefs_mtls.handshakes_failed > before
        lakefs2.close()
    finally:
        lakefs_mtls.close()
        conductor_mtls.close()


# -- (b) proxies --------------------------------------------------------------------------------


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ForwardingProxy]:
    server = ForwardingProxy()
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", server.url)
    monkeypatch.setenv("HTTP_PROXY", server.url)
    yield server
    server.close()


def _netloc(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def test_https_and_http_proxy_variables_carry_every_client(
    proxy: ForwardingProxy,
    tls_stack: TlsStack,
    endpoints: Endpoints,
    pki: Pki,
    tmp_path: Path,
) -> None:
    """HTTPS targets (the TLS lakeFS and the TLS store its presigned URLs name) through
    CONNECT tunnels; HTTP targets (the session's lakeFS, its store, Conductor) as
    absolute-form requests; each request with the proxy's credentials."""
    if endpoints.store is None:
        pytest.skip("the session's lakeFS is on the local blockstore: no presigned store leg")
    tls_settings = _settings(
        tmp_path,
        tls_stack.lakefs_url,
        endpoints.conductor_url,
        lakefs={"data_path": "presign"},
        tls=TLSSettings(ca_bundle=pki.ca),
    )
    _every_client(tls_settings, tmp_path, "proxy-tls", "proxytls")
    assert proxy.hosts("CONNECT") == {_netloc(tls_stack.lakefs_url), _netloc(tls_stack.store_url)}
    assert _netloc(endpoints.conductor_url) in proxy.hosts("GET")

    proxy.reset()
    plain = _settings(
        tmp_path,
        endpoints.lakefs_url,
        endpoints.conductor_url,
        lakefs={
            "data_path": "presign",
            "access_key_id": endpoints.lakefs_access_key_id,
            "secret_access_key": endpoints.lakefs_secret_access_key,
        },
    )
    _every_client(plain, tmp_path, "proxy-plain", "proxyplain")
    lakefs_host, store_host = _netloc(endpoints.lakefs_url), _netloc(endpoints.store.url)
    assert proxy.seen["POST", lakefs_host] >= 2  # SDK: repository, branches, commit
    assert proxy.seen["GET", lakefs_host] >= 2  # data plane: staging address, listing
    assert proxy.seen["PUT", store_host] == 1  # the presigned upload
    assert proxy.seen["GET", store_host] == 1  # the presigned download
    assert proxy.seen["GET", _netloc(endpoints.conductor_url)] >= 1
    assert proxy.hosts("CONNECT") == set()
    assert proxy.refused == 0


def test_no_proxy_matches_bypass_the_proxy(
    proxy: ForwardingProxy,
    tls_stack: TlsStack,
    endpoints: Endpoints,
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.0/8")
    settings = _settings(
        tmp_path,
        tls_stack.lakefs_url,
        endpoints.conductor_url,
        lakefs={"data_path": "presign"},
        tls=TLSSettings(ca_bundle=pki.ca),
    )
    _every_client(settings, tmp_path, "noproxy", "noproxy")
    assert sum(proxy.seen.values()) == 0, proxy.seen

    # By host and port: Conductor direct, lakeFS (and its store) still through the proxy.
    conductor_port = urllib.parse.urlsplit(endpoints.conductor_url).port
    monkeypatch.setenv("NO_PROXY", f"127.0.0.1:{conductor_port}")
    _every_client(settings, tmp_path, "noproxy-port", "noproxyport")
    assert proxy.hosts() == {_netloc(tls_stack.lakefs_url), _netloc(tls_stack.store_url)}


def test_explicit_proxy_settings_win_over_the_variables(
    proxy: ForwardingProxy, endpoints: Endpoints, tmp_path: Path
) -> None:
    """`proxy.http_proxy: ""` turns the proxy off whatever `HTTP_PROXY` says."""
    from perago_worker.settings import ProxySettings

    settings = _settings(
        tmp_path,
        endpoints.lakefs_url,
        endpoints.conductor_url,
        lakefs={
            "data_path": "api",
            "access_key_id": endpoints.lakefs_access_key_id,
            "secret_access_key": endpoints.lakefs_secret_access_key,
        },
        proxy=ProxySettings(http_proxy=""),
    )
    lakefs, conductor = clients(settings)
    try:
        lakefs.storage_config()
        next(iter(lakefs.api.list_objects(_repo(lakefs, "explicit"), "main", "")))
        conductor.get_task_defs()
    finally:
        lakefs.close()
    assert sum(proxy.seen.values()) == 0


# -- 5(a): Conductor's token auth ---------------------------------------------------------------


@pytest.fixture
def gateway(endpoints: Endpoints) -> Iterator[TokenGateway]:
    server = TokenGateway(endpoints.conductor_url, "key-1", "secret-one")
    yield server
    server.close()


def test_conductor_requests_carry_the_token_and_a_401_renews_it(
    gateway: TokenGateway, endpoints: Endpoints, tmp_path: Path
) -> None:
    settings = _settings(
        tmp_path,
        endpoints.lakefs_url,
        gateway.url,
        conductor={"auth_key": "key-1", "auth_secret": "secret-one"},
    )
    _, conductor = clients(settings)
    assert isinstance(conductor.get_task_defs(), list)
    conductor.batch_poll("perago-auth-probe", "w1", None, 1, 0)
    first = gateway.issued[0]
    calls = gateway.api_calls()
    assert calls and all(token == first and status == 200 for _, token, status in calls)
    assert gateway.token_requests() == 1

    # The server expires the token (Orkes answers 401 EXPIRED_TOKEN): the SDK renews it.
    gateway.expire_all()
    assert isinstance(conductor.get_task_defs(), list)
    assert gateway.token_requests() == 2
    second = gateway.issued[1]
    assert gateway.api_calls()[-2:] == [
        ("/api/metadata/taskdefs", first, 401),
        ("/api/metadata/taskdefs", second, 200),
    ]

    # A 401 without an error code (a revoked token): the worker renews it itself.
    gateway.expire_all(plain=True)
    conductor.batch_poll("perago-auth-probe", "w1", None, 1, 0)
    assert gateway.token_requests() == 3
    assert [s for _, _, s in gateway.api_calls()[-2:]] == [401, 200]
    assert gateway.api_calls()[-1][1] == gateway.issued[2]


def test_a_rotated_conductor_secret_file_is_what_the_next_token_request_sends(
    gateway: TokenGateway, endpoints: Endpoints, tmp_path: Path
) -> None:
    key_file, secret_file = tmp_path / "key", tmp_path / "secret"
    key_file.write_text("key-1\n")
    secret_file.write_text("secret-one\n")
    settings = _settings(
        tmp_path,
        endpoints.lakefs_url,
        gateway.url,
        conductor={"auth_key_file": key_file, "auth_secret_file": secret_file},
    )
    _, conductor = clients(settings)
    conductor.get_task_defs()
    # Rotate: the Secret volume gets the new secret, the server forgets the old one and
    # every token made with it.
    _replace(secret_file, "secret-two\n")
    with gateway.lock:
        gateway.secrets["key-1"] = "secret-two"
    gateway.expire_all()
    assert isinstance(conductor.get_task_defs(), list)
    assert gateway.api_calls()[-1][2] == 200
    assert gateway.token_requests() == 2


def _replace(path: Path, text: str) -> None:
    """As the kubelet updates a Secret volume: a new file renamed over the old one."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    fresh.replace(path)


# -- 5(b): lakeFS credentials from files, rotated -----------------------------------------------
#
# lakeFS OSS (basic auth, v1.86) cannot rotate a key pair: it holds one user with one pair
# (`MaxCredentialsPerUser = 1`, so a second pair is refused), its `DeleteCredentials` is not
# implemented, and deleting the user leaves a server that no longer starts ("auth migration
# not possible"). So the pairs that are valid are decided by a gateway written here, in
# front of the real lakeFS: it answers 401 as lakeFS does to a pair it does not hold, and
# relays every other request to lakeFS with the installation pair. Everything else (the
# SDK's calls, listings, uploads and downloads, presigned to the real store) is real.


def _pair() -> tuple[str, str]:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    key = "AKIAROT" + "".join(alphabet[b % 32] for b in os.urandom(len(DEV_ACCESS_KEY_ID) - 7))
    secret = base64.b64encode(os.urandom(48)).decode()[: len(DEV_SECRET_ACCESS_KEY)]
    return key, secret


class KeyGateway:
    """lakeFS as far as key pairs go: `valid` pairs are relayed, any other is refused."""

    def __init__(self, endpoints: Endpoints, valid: tuple[str, str]) -> None:
        self.backend = urllib.parse.urlsplit(endpoints.lakefs_url)
        token = f"{endpoints.lakefs_access_key_id}:{endpoints.lakefs_secret_access_key}"
        self.real = "Basic " + base64.b64encode(token.encode()).decode()
        self.valid = {valid}
        self.refused: list[str] = []  # the access keys of the requests answered 401
        self.relayed: Counter[str] = Counter()  # access key -> requests relayed
        self.lock = threading.Lock()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, data: bytes, headers: list[tuple[str, str]]) -> None:
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                auth = self.headers.get("Authorization", "")
                try:
                    key, _, secret = (
                        base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
                    )
                except ValueError:
                    key, secret = "", ""
                with gateway.lock:
                    ok = (key, secret) in gateway.valid
                    if ok:
                        gateway.relayed[key] += 1
                    else:
                        gateway.refused.append(key)
                if not ok:
                    answer = b'{"message":"error authenticating request"}'
                    self._answer(401, answer, [("Content-Type", "application/json")])
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in HOP_BY_HOP and k.lower() not in ("host", "authorization")
                }
                headers["Authorization"] = gateway.real
                upstream = http.client.HTTPConnection(
                    gateway.backend.hostname, gateway.backend.port, timeout=30
                )
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                upstream.close()
                self._answer(resp.status, data, resp.getheaders())

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def rotate(self, new: tuple[str, str]) -> None:
        """The new pair is valid, the old one deleted."""
        with self.lock:
            self.valid = {new}

    def refused_pair(self, pair: tuple[str, str]) -> bool:
        probe = LakeFS(self.url, *pair, retry_seconds=2)
        try:
            probe.storage_config()
        except Unauthorized:
            return True
        finally:
            probe.close()
        return False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def keys(endpoints: Endpoints) -> Iterator[tuple[KeyGateway, tuple[str, str]]]:
    first = _pair()
    gateway = KeyGateway(endpoints, first)
    yield gateway, first
    gateway.close()


def _file_settings(
    tmp_path: Path, url: str, key_file: Path, secret_file: Path, data_path: str
) -> Settings:
    return _settings(
        tmp_path,
        url,
        "http://127.0.0.1:9/api",
        lakefs={
            "access_key_id": "",
            "secret_access_key": "",
            "access_key_id_file": key_file,
            "secret_access_key_file": secret_file,
            "data_path": data_path,
        },
    )


@pytest.mark.parametrize("data_path", ["api", "presign"])
def test_rotated_lakefs_credential_files_take_effect_without_a_restart(
    keys: tuple[KeyGateway, tuple[str, str]], endpoints: Endpoints, tmp_path: Path, data_path: str
) -> None:
    if data_path == "presign" and endpoints.store is None:
        pytest.skip("the session's lakeFS is on the local blockstore: it cannot presign")
    gateway, old = keys
    new = _pair()
    key_file, secret_file = tmp_path / "access_key_id", tmp_path / "secret_access_key"
    key_file.write_text(old[0] + "\n")
    secret_file.write_text(old[1] + "\n")
    lakefs, _ = clients(_file_settings(tmp_path, gateway.url, key_file, secret_file, data_path))
    try:
        repo = _repo(lakefs, f"rotate-{data_path}")
        _round_trip(lakefs, repo, tmp_path, f"{data_path}1")
        assert lakefs.transfers.mode == data_path
        assert lakefs.credentials.key == old[0]

        gateway.rotate(new)  # lakeFS now knows only the new pair
        assert gateway.refused_pair(old)
        refused = len(gateway.refused)
        # The Secret volume gets the new pair (the kubelet's atomic rename).
        _replace(key_file, new[0] + "\n")
        _replace(secret_file, new[1] + "\n")

        _round_trip(lakefs, repo, tmp_path, f"{data_path}2")  # control and data plane
        assert lakefs.credentials.key == new[0]
        assert len(gateway.refused) == refused, "the change was seen before any request"
        assert gateway.relayed[new[0]] >= 6
    finally:
        lakefs.close()


def _rewrite_unseen(path: Path, value: str) -> None:
    """Rewrite `path` in place keeping its inode, size and modification time: a change
    the per-request `stat` cannot see."""
    stamp = path.stat()
    with path.open("r+") as handle:
        handle.write(value)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    now = path.stat()
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (
        stamp.st_ino,
        stamp.st_size,
        stamp.st_mtime_ns,
    )


@pytest.mark.parametrize("plane", ["data", "control"])
def test_a_401_rereads_credential_files_whose_change_the_stat_missed(
    keys: tuple[KeyGateway, tuple[str, str]], tmp_path: Path, plane: str
) -> None:
    """The files rewritten so that the stat sees nothing, the old pair deleted: the 401
    answered to it makes the plane that meets it re-read the files and send again."""
    gateway, old = keys
    new = _pair()
    key_file, secret_file = tmp_path / "access_key_id", tmp_path / "secret_access_key"
    key_file.write_text(old[0])
    secret_file.write_text(old[1])
    lakefs, _ = clients(_file_settings(tmp_path, gateway.url, key_file, secret_file, "api"))
    try:
        repo = _repo(lakefs, f"rotate-401-{plane}")
        _round_trip(lakefs, repo, tmp_path, f"{plane}1")
        gateway.rotate(new)
        _rewrite_unseen(key_file, new[0])
        _rewrite_unseen(secret_file, new[1])
        version = lakefs.credentials.version
        assert lakefs.credentials.key == old[0], "the stat saw no change"
        if plane == "data":
            next(iter(lakefs.api.list_objects(repo, "main", "")))  # 401, re-read, again
        else:
            lakefs.branch_head(repo, "main")
        assert gateway.refused == [old[0]]
        assert lakefs.credentials.version == version + 1
        assert lakefs.credentials.key == new[0]
        _round_trip(lakefs, repo, tmp_path, f"{plane}2")
        assert gateway.refused == [old[0]]
    finally:
        lakefs.close()


def test_a_401_to_the_current_pair_is_a_refusal(
    keys: tuple[KeyGateway, tuple[str, str]], tmp_path: Path
) -> None:
    """Files holding a pair lakeFS does not know: each plane raises `Unauthorized` after
    one request (the re-read finds nothing new), it does not loop."""
    gateway, _ = keys
    key_file, secret_file = tmp_path / "access_key_id", tmp_path / "secret_access_key"
    wrong = _pair()
    key_file.write_text(wrong[0])
    secret_file.write_text(wrong[1])
    lakefs, _ = clients(_file_settings(tmp_path, gateway.url, key_file, secret_file, "api"))
    try:
        with pytest.raises(Unauthorized):
            lakefs.storage_config()
        with pytest.raises(Unauthorized):
            next(iter(lakefs.api.list_objects("any", "main", "")))
        assert gateway.refused == [wrong[0], wrong[0]]
    finally:
        lakefs.close()


def test_unreadable_credential_files_stop_the_worker_at_start(tmp_path: Path) -> None:
    from perago_worker.compose import CliError

    settings = _settings(
        tmp_path,
        "http://127.0.0.1:9",
        "http://127.0.0.1:9/api",
        lakefs={
            "access_key_id": "",
            "secret_access_key": "",
            "access_key_id_file": tmp_path / "missing-key",
            "secret_access_key_file": tmp_path / "missing-secret",
        },
    )
    with pytest.raises(CliError, match="cannot read credentials"):
        clients(settings)


def test_conductor_without_auth_never_asks_for_a_token(
    endpoints: Endpoints, tmp_path: Path
) -> None:
    conductor = Conductor(endpoints.conductor_url)
    assert conductor.credentials is None
    assert isinstance(conductor.get_task_defs(), list)
