"""Client credentials: TLS or mutual TLS channel credentials, and the bearer token sent with every call.

The token travels as ``authorization: Bearer <token>`` metadata, added by a
client interceptor on every call. Over a plaintext channel it would cross the
network readable, so the SDK warns unless the target is loopback. Objects here
never show a token in their repr, and errors name the argument or file, never
the token.
"""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path

import grpc

from nvfp4_prep.wire import AUTHORIZATION_KEY

log = logging.getLogger(__name__)

PemSource = str | os.PathLike | bytes


def pem_bytes(source: PemSource, argument: str) -> bytes:
    """PEM bytes given as such, or read from a path."""
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            raise ValueError(f"{argument}: cannot read {str(source)!r} ({err.strerror or err})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{argument}: expected PEM (a file or bytes with -----BEGIN ...-----)")
    return data


def channel_credentials(tls_ca: PemSource | None = None, tls_cert: PemSource | None = None,
                        tls_key: PemSource | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials (None when no argument is given): ``tls_ca`` the CA that signed the server's
    certificate (default: the system's roots); ``tls_cert`` and ``tls_key`` this client's certificate
    and key for mutual TLS. Each is a path or PEM bytes."""
    if tls_ca is None and tls_cert is None and tls_key is None:
        return None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key: give both (mutual TLS) or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=pem_bytes(tls_ca, "tls_ca") if tls_ca is not None else None,
        private_key=pem_bytes(tls_key, "tls_key") if tls_key is not None else None,
        certificate_chain=pem_bytes(tls_cert, "tls_cert") if tls_cert is not None else None,
    )


def check_token(token: str, argument: str = "token") -> str:
    """``token`` stripped, if a header can carry it; the error never repeats it."""
    token = token.strip()
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"{argument}: expected a non-empty token of printable ASCII without spaces")
    return token


def read_token_file(path: str | os.PathLike, argument: str = "--token-file") -> str:
    """The first token in ``path`` (blank lines and lines starting with ``#`` skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ValueError(f"{argument}: cannot read {str(path)!r} ({reason})") from None
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return check_token(line, f"{argument} {str(path)!r}")
    raise ValueError(f"{argument}: {str(path)!r} holds no token")


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """A client interceptor that adds ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION_KEY, "Bearer " + check_token(token))

    def __repr__(self) -> str:
        return "BearerToken(<hidden>)"

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [item for item in (details.metadata or ()) if item[0] != AUTHORIZATION_KEY]
        metadata.append(self._header)
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def is_loopback(target: str) -> bool:
    """Whether every address of a target URI or host:port is this machine."""
    body = target.split(":///", 1)[-1]
    for prefix in ("ipv4:", "ipv6:", "dns:"):
        if body.startswith(prefix):
            body = body[len(prefix):]
    for address in body.split(","):
        host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
        host = host.strip("[]").lower()
        if not (host == "localhost" or host.startswith("127.") or host == "::1"):
            return False
    return True
