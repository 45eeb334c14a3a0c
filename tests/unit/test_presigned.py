"""Specification of the presigned data path's request shapes: no servers.

Part sizes stay inside S3's multipart limits, the ETag rules are S3's, each store gets the
headers its PUT needs, and a presigned URL (a bearer credential) stays out of every text
the worker could log or report: a repr, an error, a store's error answer.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perago_worker.lakefs import ContentMismatch, LakeFSError, ObjectInfo, StoreError, is_transient
from perago_worker.lakefs.connections import Connections
from perago_worker.lakefs.presigned import (
    MAX_PARTS,
    MIB,
    PART_SIZE,
    etag_of,
    is_md5_etag,
    multipart_etag,
    part_size_for,
    put_headers,
    store_code,
)

# What a presigned URL carries: anything with these in it is a leaked credential.
SIGNATURE = "X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
CREDENTIAL = "X-Amz-Credential=AKIAEXAMPLE%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
TARGET = f"/bucket/repo/data/abc?X-Amz-Algorithm=AWS4-HMAC-SHA256&{CREDENTIAL}&{SIGNATURE}"
URL = "https://store.example.com" + TARGET
TIB = 1 << 40
S3_MAX_OBJECT = 5 * TIB


# -- part sizes ----------------------------------------------------------------------------


def test_part_size_is_16_mib_for_the_smallest_multipart_file() -> None:
    assert PART_SIZE == 16 * MIB
    assert part_size_for(64 * MIB) == 16 * MIB


def test_part_size_grows_past_the_floor_only_when_the_floor_needs_too_many_parts() -> None:
    assert part_size_for(MAX_PARTS * 16 * MIB) == 16 * MIB
    assert part_size_for(MAX_PARTS * 16 * MIB + 1) == 17 * MIB


def test_part_size_of_s3s_largest_object_is_the_smallest_whole_mib_under_10000_parts() -> None:
    # 5 TiB / 10,000 = 524.288 MiB: 525 MiB parts, 9,987 of them.
    assert part_size_for(S3_MAX_OBJECT) == 525 * MIB
    assert -(-S3_MAX_OBJECT // (525 * MIB)) == 9_987


@given(st.integers(min_value=1, max_value=S3_MAX_OBJECT))
def test_part_size_is_whole_mib_at_least_16_mib_and_never_needs_more_than_max_parts(
    size: int,
) -> None:
    part = part_size_for(size)
    assert part % MIB == 0
    assert part >= 16 * MIB
    assert -(-size // part) <= MAX_PARTS


@given(st.integers(min_value=1, max_value=S3_MAX_OBJECT))
def test_part_size_is_the_smallest_that_fits(size: int) -> None:
    part = part_size_for(size)
    smaller = part - MIB
    assert part == PART_SIZE or -(-size // smaller) > MAX_PARTS


# -- ETags ---------------------------------------------------------------------------------


def test_multipart_etag_is_the_md5_of_the_parts_binary_md5s_dash_their_count() -> None:
    parts = [b"a" * (5 * MIB), b"b" * (5 * MIB), b"tail"]
    hex_md5s = [hashlib.md5(p).hexdigest() for p in parts]
    # S3's rule, spelled from the hex digests: concatenate the binary digests, MD5 that.
    expected = hashlib.md5(b"".join(bytes.fromhex(h) for h in hex_md5s)).hexdigest()
    got = multipart_etag([hashlib.md5(p).digest() for p in parts])
    assert got == f"{expected}-3"
    assert got.split("-")[0] != hashlib.md5(b"".join(parts)).hexdigest()


def test_multipart_etag_of_one_part_is_not_that_parts_md5() -> None:
    digest = hashlib.md5(b"only part").digest()
    etag = multipart_etag([digest])
    assert etag.endswith("-1")
    assert etag != digest.hex() and etag.removesuffix("-1") == hashlib.md5(digest).hexdigest()


@pytest.mark.parametrize(
    "etag",
    [
        "d41d8cd98f00b204e9800998ecf8427e",  # MD5 of nothing
        "9b2cf535f27731c974343645a3985328-3",  # multipart
        "9b2cf535f27731c974343645a3985328-10000",
    ],
)
def test_an_md5_etag_is_32_hex_digits_with_an_optional_part_count(etag: str) -> None:
    assert is_md5_etag(etag)


@pytest.mark.parametrize(
    "etag",
    [
        "",
        '"d41d8cd98f00b204e9800998ecf8427e"',  # quoted: etag_of strips quotes first
        "d41d8cd98f00b204e9800998ecf8427",  # 31 digits
        "d41d8cd98f00b204e9800998ecf8427e-",  # a dash without a count
        "D41D8CD98F00B204E9800998ECF8427E",  # etag_of lowers the case first
        "0x8DC4A3B2F1E0D9C",  # Azure
        "CJiJ0r3Rw4gDEAE=",  # GCS generation-style
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",  # SHA-256
        "zz1d8cd98f00b204e9800998ecf8427e",
    ],
)
def test_other_etags_are_not_md5s(etag: str) -> None:
    assert not is_md5_etag(etag)


def test_etag_of_strips_quotes_and_spaces_and_lowers_the_case() -> None:
    assert etag_of(' "D41D8CD98F00B204E9800998ECF8427E" ') == "d41d8cd98f00b204e9800998ecf8427e"
    assert is_md5_etag(etag_of('"D41D8CD98F00B204E9800998ECF8427E-2"'))
    assert etag_of(None) == ""


# -- PUT headers ---------------------------------------------------------------------------


def test_an_azure_put_names_the_blob_type() -> None:
    headers = put_headers("azure", 10)
    assert headers["x-ms-blob-type"] == "BlockBlob"
    assert headers["Content-Length"] == "10"


@pytest.mark.parametrize("blockstore", ["s3", "gs"])
def test_s3_and_gcs_puts_carry_no_azure_header(blockstore: str) -> None:
    headers = put_headers(blockstore, 123)
    assert not any(k.lower().startswith("x-ms-") for k in headers)
    assert headers == {"Content-Length": "123", "Content-Type": "application/octet-stream"}


# -- the store's error answers ---------------------------------------------------------------


def s3_error(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{TARGET}</Resource><RequestId>4442587FB7D0A2F9</RequestId></Error>"
    ).encode()


def test_store_code_finds_the_s3_error_code() -> None:
    assert store_code(s3_error("AccessDenied", "Request has expired.")) == "AccessDenied"
    assert store_code(s3_error("SignatureDoesNotMatch", "no")) == "SignatureDoesNotMatch"


def test_store_code_returns_only_the_code_never_the_body() -> None:
    body = s3_error("AccessDenied", f"Request has expired. {URL}")
    code = store_code(body)
    assert code == "AccessDenied"
    assert "X-Amz" not in code and "Request has expired" not in code


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html><body>502 Bad Gateway</body></html>",
        f"<Error><Code>{URL}</Code></Error>".encode(),  # a code that is not a code
        b" " * 4096 + b"<Code>AccessDenied</Code>",  # past the part that is read
    ],
    ids=["empty", "html", "url-as-code", "code-past-4-kib"],
)
def test_store_code_of_an_answer_without_a_plain_code_says_so(body: bytes) -> None:
    assert store_code(body) == "no error code"


# -- what the worker prints ----------------------------------------------------------------


def test_an_object_infos_repr_leaves_out_its_presigned_url() -> None:
    info = ObjectInfo("data/a.bin", 3, "abc", 1, physical_address=URL, address_expiry=99)
    for text in (repr(info), str(info), f"{info!r}", repr([info]), repr({"obj": info})):
        assert "X-Amz" not in text and "store.example.com" not in text
        assert "data/a.bin" in text


def test_a_store_error_reads_as_the_store_its_status_and_the_message() -> None:
    exc = StoreError(502, "data/a.bin: got 2 bytes, the listing says 3")
    assert str(exc) == "object store 502: data/a.bin: got 2 bytes, the listing says 3"
    assert isinstance(exc, LakeFSError)
    assert (exc.status, exc.message) == (502, "data/a.bin: got 2 bytes, the listing says 3")


def test_a_store_refusal_is_not_retried_and_a_store_fault_is() -> None:
    assert not is_transient(StoreError(403, "data/a.bin: GET answered AccessDenied"))
    assert is_transient(StoreError(503, "data/a.bin: PUT refused (AccessDenied); renewed its URL"))


def test_other_bytes_from_the_store_are_never_retried_but_a_body_cut_short_is() -> None:
    import http.client

    mismatch = ContentMismatch("data/a.bin: the store stored other bytes (ETag 00)")
    assert isinstance(mismatch, StoreError) and mismatch.status == 502
    assert not is_transient(mismatch)
    assert is_transient(http.client.IncompleteRead(b"partial", 10))


# -- connections -----------------------------------------------------------------------------


@pytest.fixture
def garbage_server() -> Iterator[str]:
    """A loopback socket that answers every request with a line that is not HTTP."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"NOT-HTTP garbage\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.shutdown(socket.SHUT_RDWR)  # wakes the accept (closing alone does not)
    server.close()
    thread.join(5)
    assert not thread.is_alive()


def test_a_malformed_answer_is_a_connection_error_that_names_no_request_target(
    garbage_server: str,
) -> None:
    conns = Connections(garbage_server, timeout=5)
    with pytest.raises(ConnectionError) as caught:
        conns.request("GET", TARGET)
    text = str(caught.value)
    assert "X-Amz" not in text and "/bucket/repo" not in text
    assert text == "BadStatusLine from 127.0.0.1"
    # Raised `from None`: a traceback shows neither the cause nor the context.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert is_transient(caught.value)
    conns.close()


def test_a_request_target_http_client_refuses_is_not_quoted_in_the_error() -> None:
    # http.client's InvalidURL quotes the whole target; no connection is even opened.
    conns = Connections("http://127.0.0.1:9", timeout=5)
    with pytest.raises(ConnectionError) as caught:
        conns.request("GET", TARGET + "&x=a\nb")
    assert str(caught.value) == "InvalidURL from 127.0.0.1"
    assert "X-Amz" not in str(caught.value)
    assert isinstance(http.client.InvalidURL(), http.client.HTTPException)  # the premise


def test_a_refused_connection_is_raised_as_is_and_names_no_request_target() -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    conns = Connections(f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(ConnectionRefusedError) as caught:
        conns.request("GET", TARGET)
    assert "X-Amz" not in str(caught.value) and "/bucket" not in str(caught.value)


# -- review fixes: connections end with their threads; faults classified ----------------------


@pytest.fixture
def ok_server() -> Iterator[str]:
    """A loopback HTTP/1.1 server answering every GET with `ok` (keep-alive)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_connections_of_finished_threads_are_closed_and_forgotten(ok_server: str) -> None:
    import gc
    import threading

    from perago_worker.lakefs.connections import Connections

    conns = Connections(ok_server, 5)
    opened: list[object] = []

    def transfer() -> None:
        resp = conns.request("GET", "/")
        resp.read()
        opened.append(conns._local.slot.conn)

    for _ in range(20):  # a transfer pool per attempt, as materialize and stage make
        pool = [threading.Thread(target=transfer) for _ in range(4)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    gc.collect()
    assert len(opened) == 80 and len(conns._all) == 0
    assert all(conn.sock is None for conn in opened)  # type: ignore[attr-defined]


def test_a_response_left_half_read_never_carries_the_next_request(ok_server: str) -> None:
    from perago_worker.lakefs.connections import Connections

    conns = Connections(ok_server, 5)
    conns.request("GET", "/")  # its reader failed: the body was never read
    assert conns.request("GET", "/").read() == b"ok"


@pytest.mark.parametrize(
    "fault",
    [
        lambda: __import__("socket").gaierror(-3, "Temporary failure in name resolution"),
        lambda: OSError(113, "No route to host"),
        lambda: __import__("ssl").SSLEOFError(8, "EOF occurred in violation of protocol"),
        lambda: OSError("Tunnel connection failed: 503 Service Unavailable"),
    ],
    ids=["dns-again", "no-route", "tls-eof", "proxy-503"],
)
def testis_network_faults_below_connection_errors_are_retried(fault: Any) -> None:
    from perago_worker.lakefs.connections import is_network_fault

    exc = fault()
    assert is_network_fault(exc)


def test_a_name_that_does_not_exist_and_a_refused_proxy_login_are_not_retried() -> None:
    import socket

    from perago_worker.lakefs.connections import is_network_fault

    assert not is_network_fault(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert not is_network_fault(OSError("Tunnel connection failed: 407 Proxy Authentication"))


def test_encrypted_objects_etags_are_not_checked_as_md5s() -> None:
    from types import SimpleNamespace

    from perago_worker.lakefs.presigned import content_etag

    def answer(**headers: str) -> Any:
        return SimpleNamespace(getheader=lambda name: headers.get(name))

    md5 = "0" * 32
    assert content_etag(answer(ETag=f'"{md5}"')) == md5
    assert (
        content_etag(answer(ETag=f'"{md5}"', **{"x-amz-server-side-encryption": "aws:kms"})) == ""
    )
    sse_c = {"x-amz-server-side-encryption-customer-algorithm": "AES256"}
    assert content_etag(answer(ETag=f'"{md5}"', **sse_c)) == ""
    assert content_etag(answer(ETag='"0x8D9F0A"')) == ""  # Azure's
