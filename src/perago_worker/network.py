"""TLS and forwarding proxies, decided once and applied the same way to every client.

The worker talks HTTP three ways: the lakeFS SDK (urllib3), the data plane's keep-alive
`http.client` connections (`lakefs.connections.Connections`: to lakeFS, and to the object
store on presigned URLs) and conductor-python (httpx). Left alone, each would do its own
thing: urllib3 ignores the proxy variables, httpx reads them only without a custom
transport (the SDK sets one), `http.client` knows no proxies at all, and each trusts a
different CA store. `Network` is the one answer for all three:

- **TLS**: one policy (`tls.verify`, `tls.ca_bundle`, `tls.client_cert` / `tls.client_key`)
  as `ssl.SSLContext`s built from it. The data plane's connections share one context; the
  SDK and Conductor each get their own, built the same way, because urllib3 and httpx write
  to the context they are given (httpx sets its ALPN protocols to offer HTTP/2, which a
  shared `http.client` connection must not offer).
- **Proxies**: `proxy.https_proxy`, `proxy.http_proxy` and `proxy.no_proxy`, each read
  from the standard environment variables when the setting is unset, once, at start. A
  target whose host matches `no_proxy` is reached directly; an `https` target goes through
  its proxy in a CONNECT tunnel (TLS end to end, the proxy sees only the host), a plain
  `http` one as an absolute-form request the proxy forwards.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import ssl
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from perago_worker.settings import Settings


class NetworkError(ValueError):
    """A TLS or proxy setting that cannot be used (a missing CA file, a bad proxy URL)."""


class CertificateRefused(ssl.SSLCertVerificationError):
    """A server's certificate the worker does not trust: never retried."""


_VERIFY_DETAIL = re.compile(r"certificate verify failed: ([^()]+?)\s*(?:\(|$)")


def certificate_message(where: str, text: str) -> str:
    """What to say when `where`'s certificate was refused (`text`: the library's words)."""
    found = _VERIFY_DETAIL.search(text)
    detail = found.group(1).strip() if found else "certificate verify failed"
    return (
        f"the TLS certificate of {where} is not trusted ({detail}): set tls.ca_bundle to the "
        "CA that signed it"
    )


def is_certificate_failure(text: str) -> bool:
    return "CERTIFICATE_VERIFY_FAILED" in text


@dataclass(frozen=True)
class Proxy:
    """A forwarding proxy: where it listens and the headers it needs (its credentials)."""

    url: str
    host: str
    port: int
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # never the credentials
        return f"Proxy({self.host}:{self.port})"


def parse_proxy(url: str) -> Proxy:
    """`http://[user:password@]host[:port]` as a `Proxy`; `NetworkError` for anything else.

    Only plain-HTTP proxies: the connection to the proxy is not encrypted (an `https`
    target's TLS runs inside the CONNECT tunnel, end to end)."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise NetworkError(
            f"a proxy must be an http://host:port URL (got scheme {parts.scheme or 'none'!r})"
        )
    try:
        port = parts.port or 80
    except ValueError:
        raise NetworkError("a proxy URL's port is not a number") from None
    headers: dict[str, str] = {}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Proxy-Authorization"] = f"Basic {token}"
    return Proxy(url, parts.hostname, port, headers)


def _env(environ: Mapping[str, str], name: str) -> str:
    """`name` from the environment, lowercase spelling first (as curl and urllib read it)."""
    return environ.get(name.lower()) or environ.get(name.upper()) or ""


class NoProxy:
    """A `no_proxy` list: `*`, host names, domains (`example.com` or `.example.com`, which
    also match their subdomains), any of them with `:port`, IP addresses and CIDR ranges."""

    def __init__(self, value: str) -> None:
        self.everything = False
        self._names: list[tuple[str, int | None]] = []
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for raw in value.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                self.everything = True
                continue
            host, port = _split_port(entry)
            try:
                self._networks.append((ipaddress.ip_network(host, strict=False), port))
                continue
            except ValueError:
                pass
            host = host.removeprefix("*").lstrip(".")
            if host:
                self._names.append((host, port))

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        host = host.strip("[]").lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        for network, want in self._networks:
            if address is not None and address in network and want in (None, port):
                return True
        return any(
            (host == name or host.endswith("." + name)) and want in (None, port)
            for name, want in self._names
        )


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [::1]:8080
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None


class Network:
    """The TLS policy and the proxies every client of the worker uses."""

    def __init__(
        self,
        *,
        verify: bool = True,
        ca_bundle: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        https_proxy: str = "",
        http_proxy: str = "",
        no_proxy: str = "",
    ) -> None:
        self.verify = verify
        self.ca_bundle = ca_bundle
        self.client_cert = client_cert
        self.client_key = client_key
        self.https_proxy = parse_proxy(https_proxy) if https_proxy else None
        self.http_proxy = parse_proxy(http_proxy) if http_proxy else None
        self.no_proxy = NoProxy(no_proxy)
        self._shared: ssl.SSLContext | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> Network:
        """The settings' TLS policy and proxies; an unset proxy setting reads its standard
        environment variable (`https_proxy`/`HTTPS_PROXY`, `http_proxy`/`HTTP_PROXY`,
        `no_proxy`/`NO_PROXY`), here, once."""
        env = os.environ if environ is None else environ
        tls, proxy = settings.tls, settings.proxy

        def pick(value: str | None, name: str) -> str:
            return _env(env, name) if value is None else value

        try:
            network = cls(
                verify=tls.verify,
                ca_bundle=tls.ca_bundle,
                client_cert=tls.client_cert,
                client_key=tls.client_key,
                https_proxy=pick(proxy.https_proxy, "HTTPS_PROXY"),
                http_proxy=pick(proxy.http_proxy, "HTTP_PROXY"),
                no_proxy=pick(proxy.no_proxy, "NO_PROXY"),
            )
        except NetworkError as exc:
            raise NetworkError(f"proxy: {exc}") from None
        network.ssl_context()  # a CA bundle or client certificate that cannot load fails now
        return network

    # -- TLS ---------------------------------------------------------------------------------

    def new_ssl_context(self) -> ssl.SSLContext:
        """A fresh context carrying the policy (for a library that writes to its context)."""
        try:
            if self.ca_bundle is not None:
                context = ssl.create_default_context(cafile=str(self.ca_bundle))
            else:
                context = ssl.create_default_context()
                if not context.cert_store_stats().get("x509_ca"):
                    _load_certifi(context)
        except (OSError, ssl.SSLError) as exc:
            raise NetworkError(f"tls.ca_bundle: cannot load {self.ca_bundle}: {exc}") from None
        if self.client_cert is not None:
            try:
                context.load_cert_chain(
                    str(self.client_cert), str(self.client_key) if self.client_key else None
                )
            except (OSError, ssl.SSLError) as exc:
                raise NetworkError(
                    f"tls.client_cert: cannot load {self.client_cert}: {exc}"
                ) from None
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def ssl_context(self) -> ssl.SSLContext:
        """The context the data plane's connections share (built once)."""
        with self._lock:
            if self._shared is None:
                self._shared = self.new_ssl_context()
            return self._shared

    # -- proxies -----------------------------------------------------------------------------

    def proxy_for(self, url: str) -> Proxy | None:
        """The proxy a request to `url` goes through, or None to connect directly."""
        parts = urllib.parse.urlsplit(url)
        proxy = self.https_proxy if parts.scheme == "https" else self.http_proxy
        if proxy is None or not parts.hostname:
            return None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return None if self.no_proxy.matches(parts.hostname, port) else proxy

    def describe(self) -> str:
        """One line for the start-up log (never a proxy's credentials)."""
        trust = "off" if not self.verify else str(self.ca_bundle or "system CAs")
        proxies = ", ".join(
            f"{scheme} via {p.host}:{p.port}"
            for scheme, p in (("https", self.https_proxy), ("http", self.http_proxy))
            if p is not None
        )
        return f"tls verify {trust}" + (f"; {proxies}" if proxies else "; no proxy")


def _load_certifi(context: ssl.SSLContext) -> None:
    """A system without a CA store (a bare container): trust certifi's bundle instead."""
    try:
        import certifi
    except ImportError:  # pragma: no cover - certifi comes with httpx
        return
    context.load_verify_locations(certifi.where())
