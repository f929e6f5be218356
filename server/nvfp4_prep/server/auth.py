"""Bearer-token authentication: a server interceptor that lets a call in only with a known token.

Clients send ``authorization: Bearer <token>`` metadata. Tokens come from the
file named by ``--auth-token-file``, one per line, so that a rotation can list
the old and the new token for a while. Only SHA-256 digests of the tokens are
kept, compared in constant time, and neither a token nor what a caller
presented is ever logged. Health checking can stay open to unauthenticated
callers (Kubernetes probes carry no credentials).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grpc

from nvfp4_prep.wire import AUTHORIZATION_KEY

from .config import ConfigError
from .status import abort, status

log = logging.getLogger(__name__)

BEARER = "bearer "
HEALTH_SERVICE = "grpc.health.v1.Health"
# Shorter tokens are refused at start-up: they could be guessed.
MIN_TOKEN_LENGTH = 16


def read_token_file(path: Path) -> tuple[str, ...]:
    """The tokens in ``path``: one per line, blank lines and lines starting with ``#`` ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(f"--auth-token-file: cannot read {str(path)!r} ({reason})") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        # The token itself is never echoed, only where it is and what is wrong with it.
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"--auth-token-file: the token on line {number} of {str(path)!r} has {len(token)} "
                              f"characters (expected at least {MIN_TOKEN_LENGTH})")
        if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            raise ConfigError(f"--auth-token-file: the token on line {number} of {str(path)!r} has characters "
                              "a header cannot carry (expected printable ASCII without spaces)")
        tokens.append(token)
    if not tokens:
        raise ConfigError(f"--auth-token-file: {str(path)!r} holds no token (expected one token per line)")
    return tuple(tokens)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _presented(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token in ``metadata``, or None when there is none."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str) and value[:len(BEARER)].lower() == BEARER:
            return value[len(BEARER):].strip()
    return None


def _refusal(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails the call with UNAUTHENTICATED."""

    def refuse(_request: object, context: grpc.ServicerContext) -> None:
        abort(context, status(grpc.StatusCode.UNAUTHENTICATED, message))

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    make: Callable[..., grpc.RpcMethodHandler] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(refuse)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Lets a call through when it carries one of ``tokens``; ``open_services`` need no token."""

    def __init__(self, tokens: Sequence[str], open_services: Sequence[str] = ()) -> None:
        if not tokens:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        self._digests = tuple(_digest(token) for token in tokens)
        self._open = frozenset(open_services)

    def _known(self, token: str) -> bool:
        digest = _digest(token)
        found = False
        for known in self._digests:  # every digest is compared, so timing does not tell which matched
            found |= hmac.compare_digest(digest, known)
        return found

    def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method or ""
        if method.lstrip("/").split("/", 1)[0] in self._open:
            return continuation(handler_call_details)
        token = _presented(handler_call_details.invocation_metadata)
        if token is not None and self._known(token):
            return continuation(handler_call_details)
        problem = "no bearer token" if token is None else "a bearer token this server does not accept"
        log.warning("refused %s: the call carried %s", method, problem)
        return _refusal(continuation(handler_call_details),
                        f"{AUTHORIZATION_KEY}: the call carried {problem} "
                        "(expected metadata 'authorization: Bearer <token>' with a token from --auth-token-file)")
