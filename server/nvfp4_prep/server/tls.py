"""TLS for the server: its certificate chain and key, and for mutual TLS the CA that client certificates
must chain to; the gRPC port and the ``/metrics`` listener use the same files.

The files are read and checked once at start-up with the standard library's
``ssl`` module (a key that does not match its certificate, an encrypted key or
a file that is not PEM stops the server with an error naming the flag), so a
bad Secret fails the pod at once instead of failing every handshake later.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from .config import ConfigError


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{flag}: cannot read {str(path)!r} ({err.strerror or err})") from None


def _no_password() -> bytes:
    # Returned to OpenSSL instead of letting it prompt on a terminal for an encrypted key.
    return b""


def _checked(cert: Path, key: Path, client_ca: Path | None) -> tuple[ssl.SSLContext, bytes, bytes, bytes | None]:
    """A server context for ``cert``, ``key`` and ``client_ca`` (wanting client certificates then), and the
    PEM bytes it was made of, every file checked."""
    chain, private = _read(cert, "--tls-cert"), _read(key, "--tls-key")
    if b"-----BEGIN CERTIFICATE-----" not in chain:
        raise ConfigError(f"--tls-cert: {str(cert)!r} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in private:
        raise ConfigError(f"--tls-key: {str(key)!r} holds no PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as err:
        raise ConfigError(f"--tls-cert/--tls-key: {str(cert)!r} and {str(key)!r} do not form a usable pair "
                          f"(expected the certificate and its unencrypted private key; {err.reason or err})") from None
    roots = None
    if client_ca is not None:
        roots = _read(client_ca, "--tls-client-ca")
        try:
            context.load_verify_locations(cadata=roots.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as err:
            raise ConfigError(f"--tls-client-ca: {str(client_ca)!r} holds no usable PEM CA certificate "
                              f"({getattr(err, 'reason', None) or err})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context, chain, private, roots


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port``; with ``client_ca`` every client must present a certificate
    that chains to it (mutual TLS)."""
    _, chain, private, roots = _checked(cert, key, client_ca)
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


def https_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The same certificate for an HTTPS listener (``/metrics``); with ``client_ca`` it too wants a client
    certificate that chains to it."""
    return _checked(cert, key, client_ca)[0]
