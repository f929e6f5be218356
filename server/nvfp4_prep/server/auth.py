"""Bearer-token authentication: a server interceptor that lets a call in only with a known token.

Clients send ``authorization: Bearer <token>`` metadata. Tokens come from the
file named by ``--auth-token-file``, one per line, so that a rotation can list
the old and the new token for a while. Only SHA-256 digests of the tokens are
kept, compared in constant time, and neither a token nor anything else a
caller sent (its method path included) is ever logged: refusals go to a
``RefusalLog``, which logs the reason and the peer address at most. Health
checking can stay open to unauthenticated callers (Kubernetes probes carry no
credentials). The ``/metrics`` listener checks its ``Authorization`` header
with the same ``TokenSet``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grpc

from nvfp4_prep.wire import AUTHORIZATION_KEY

from .config import ConfigError
from .refusals import DESCRIPTIONS, GRPC, NO_TOKEN, UNKNOWN_TOKEN, RefusalLog
from .status import abort, status

BEARER = "bearer "
HEALTH_SERVICE = "grpc.health.v1.Health"
# Shorter tokens are refused at start-up: they could be guessed.
MIN_TOKEN_LENGTH = 16


def read_token_file(path: Path, flag: str = "--auth-token-file") -> tuple[str, ...]:
    """The tokens in ``path``: one per line, blank lines and lines starting with ``#`` ignored; errors name
    ``flag``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(f"{flag}: cannot read {str(path)!r} ({reason})") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        # The token itself is never echoed, only where it is and what is wrong with it.
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"{flag}: the token on line {number} of {str(path)!r} has {len(token)} "
                              f"characters (expected at least {MIN_TOKEN_LENGTH})")
        if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            raise ConfigError(f"{flag}: the token on line {number} of {str(path)!r} has characters "
                              "a header cannot carry (expected printable ASCII without spaces)")
        tokens.append(token)
    if not tokens:
        raise ConfigError(f"{flag}: {str(path)!r} holds no token (expected one token per line)")
    return tuple(tokens)


class TokenSet:
    """The accepted tokens, kept only as SHA-256 digests and compared in constant time."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("TokenSet needs at least one token")
        self._digests = tuple(_digest(token) for token in tokens)

    def accepts(self, token: str) -> bool:
        digest = _digest(token)
        found = False
        for known in self._digests:  # every digest is compared, so timing does not tell which matched
            found |= hmac.compare_digest(digest, known)
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def bearer_token(value: str | None) -> str | None:
    """The token of an ``authorization`` value ``Bearer <token>``, or None when it is not one."""
    if isinstance(value, str) and value[:len(BEARER)].lower() == BEARER:
        return value[len(BEARER):].strip()
    return None


def refusal_reason(tokens: TokenSet, token: str | None) -> str | None:
    """Why a call presenting ``token`` is refused (a ``refusals`` reason), or None when it may pass."""
    if token is None:
        return NO_TOKEN
    return None if tokens.accepts(token) else UNKNOWN_TOKEN


def _presented(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token in ``metadata``, or None when there is none."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str):
            token = bearer_token(value)
            if token is not None:
                return token
    return None


def _refusal(handler: grpc.RpcMethodHandler | None, reason: str, refusals: RefusalLog) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that records the refusal and fails the call with
    UNAUTHENTICATED."""
    message = (f"{AUTHORIZATION_KEY}: the call carried {DESCRIPTIONS[reason]} "
               "(expected metadata 'authorization: Bearer <token>' with a token from --auth-token-file)")

    def refuse(_request: object, context: grpc.ServicerContext) -> None:
        refusals.refused(GRPC, reason, context.peer())
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
    """Lets a call through when it carries one of ``tokens``; ``open_services`` need no token. Refusals are
    counted and logged by ``refusals``, never with the caller's method path or metadata."""

    def __init__(self, tokens: Sequence[str], open_services: Sequence[str] = ()) -> None:
        if not tokens:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        self._tokens = TokenSet(tokens)
        self._open = frozenset(open_services)
        self.refusals = RefusalLog()

    def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method or ""
        if method.lstrip("/").split("/", 1)[0] in self._open:
            return continuation(handler_call_details)
        reason = refusal_reason(self._tokens, _presented(handler_call_details.invocation_metadata))
        if reason is None:
            return continuation(handler_call_details)
        return _refusal(continuation(handler_call_details), reason, self.refusals)
