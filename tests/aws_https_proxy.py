"""An HTTPS proxy that brings a program with no ``AWS_ENDPOINT_URL`` support to the local AWS.

Debian's amazon-ecr-credential-helper (aws-sdk-go-v2 of 2022) always calls AWS's real endpoints
(``https://api.ecr.<region>.amazonaws.com``). Given ``HTTPS_PROXY`` it asks this proxy to ``CONNECT`` there, as Go's
``http.ProxyFromEnvironment`` does; the proxy answers the TLS handshake with a certificate for that host signed by a
certificate authority of its own (the program trusts it through ``SSL_CERT_FILE``, which Go's ``crypto/x509`` reads
on Linux), and forwards each request, its ``Host`` header and signature untouched, to the local AWS endpoint: moto
server routes a request by its host, as it does in its own proxy mode, and the AWS shim on the way applies its
rules. Every forwarded request is kept in :attr:`AwsHttpsProxy.requests` (host, method, path, ``X-Amz-Target``),
so a test sees what the program asked AWS for. Any host outside ``amazonaws.com`` is refused (no network here).
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import select
import socket
import socketserver
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

_MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class ProxiedRequest:
    host: str
    method: str
    path: str
    target: str  # the X-Amz-Target header of JSON protocols (ECR, DynamoDB): which operation


class _CertificateAuthority:
    """A CA made for this proxy's lifetime, and a leaf certificate per host, made on first use."""

    def __init__(self, directory: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "runner-fleet test AWS proxy CA")])
        now = datetime.datetime.now(datetime.UTC)
        self._name = name
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.bundle = directory / "ca.pem"
        self.bundle.write_bytes(self._certificate.public_bytes(serialization.Encoding.PEM))
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def context_for(self, host: str) -> ssl.SSLContext:
        with self._lock:
            found = self._contexts.get(host)
            if found is None:
                found = self._contexts[host] = self._leaf_context(host)
            return found

    def _leaf_context(self, host: str) -> ssl.SSLContext:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        try:
            alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            alternative = x509.DNSName(host)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        safe = host.replace(":", "_")
        chain = self._directory / f"{safe}.pem"
        chain.write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
            + self._certificate.public_bytes(serialization.Encoding.PEM)
        )
        key_file = self._directory / f"{safe}.key"
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain, key_file)
        return context


class AwsHttpsProxy:
    """``with AwsHttpsProxy(endpoint, directory) as proxy``: ``proxy.environment()`` is what the program needs."""

    def __init__(self, endpoint_url: str, directory: Path) -> None:
        self._upstream = urllib.parse.urlsplit(endpoint_url)
        self._authority = _CertificateAuthority(directory)
        self.requests: list[ProxiedRequest] = []
        self._server: socketserver.ThreadingTCPServer | None = None

    def __enter__(self) -> Self:
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._tunnel(self.connection)

        socketserver.ThreadingTCPServer.daemon_threads = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="aws-https-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def environment(self) -> dict[str, str]:
        """HTTPS through this proxy, trusting its CA; the local AWS's own address not proxied."""
        return {
            "HTTPS_PROXY": self.url,
            "https_proxy": self.url,
            "NO_PROXY": "",
            "SSL_CERT_FILE": str(self._authority.bundle),
        }

    # -- one client connection ---------------------------------------------------------------------------

    def _tunnel(self, client: socket.socket) -> None:
        head = _read_head(client)
        if head is None:
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, target = request_line.partition(" ")
        authority = target.split(" ", 1)[0]
        host = authority.rsplit(":", 1)[0]
        if method != "CONNECT" or not host.endswith(".amazonaws.com"):
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            tls = self._authority.context_for(host).wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with tls:
            while self._forward_one(tls, host):
                pass

    def _forward_one(self, tls: ssl.SSLSocket, host: str) -> bool:
        head = _read_head(tls)
        if head is None:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip()] = value.strip()
        length = int(_header(headers, "Content-Length") or 0)
        body = _read_exactly(tls, min(length, _MAX_BODY))
        self.requests.append(ProxiedRequest(host, method, path, _header(headers, "X-Amz-Target") or ""))
        upstream = http.client.HTTPConnection(self._upstream.hostname, self._upstream.port, timeout=60)
        try:
            upstream.request(method, path, body=body, headers=headers)
            answer = upstream.getresponse()
            payload = answer.read()
        finally:
            upstream.close()
        status = f"HTTP/1.1 {answer.status} {answer.reason}\r\n"
        kept = [(k, v) for k, v in answer.getheaders() if k.lower() not in ("transfer-encoding", "connection")]
        kept = [(k, v) for k, v in kept if k.lower() != "content-length"] + [("Content-Length", str(len(payload)))]
        tls.sendall(status.encode() + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in kept) + b"\r\n" + payload)
        return (_header(headers, "Connection") or "").lower() != "close"


def _header(headers: dict[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def _read_head(sock: Any) -> bytes | None:
    """Bytes up to the blank line ending an HTTP head, or None when the peer closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        if not isinstance(sock, ssl.SSLSocket) or not sock.pending():
            ready, _, _ = select.select([sock], [], [], 30)
            if not ready:
                return None
        chunk = sock.recv(1)
        if not chunk:
            return None
        data += chunk
        if len(data) > 65536:
            return None
    return data


def _read_exactly(sock: Any, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            break
        data += chunk
    return data
