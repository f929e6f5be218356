"""Turning the SDK's ``targets`` into gRPC channels that spread calls over replicas."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

import grpc

from nvfp4_prep.wire import MAX_CHUNK_SIZE, MESSAGE_OVERHEAD

_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
# Keepalive, matched with what the server permits: it accepts pings every --keepalive-permit-time
# seconds (default 20), also between calls, so pinging every 30 s never earns a too_many_pings
# GOAWAY, while a dead server or a dropped connection is noticed within 30 + 20 s even while a
# long prepare sends nothing. A server started with a larger --keepalive-permit-time needs
# ("grpc.keepalive_time_ms", ...) in PrepClient's options to match.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 20_000
# gRPC waits longer and longer between reconnection attempts to a server that is down (up to 120 s by
# default) and fails calls at once meanwhile, so a server back after a restart went unnoticed for most of
# the SDK's retry window. Capped at the SDK's own largest pause between retries.
MAX_RECONNECT_BACKOFF_MS = 5_000


def target_uri(targets: str | Sequence[str]) -> str:
    """A gRPC target from a URI (``dns:///svc:50051``, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``,
    ``host:port``) or from a list of ``address:port`` strings with IP literals."""
    if isinstance(targets, str):
        if not targets.strip():
            raise ValueError("targets: empty; expected host:port, a gRPC URI or a list of ip:port")
        return targets.strip()
    addresses = [str(t).strip() for t in targets]
    if not addresses:
        raise ValueError("targets: empty list; expected at least one ip:port")
    if len(addresses) == 1:
        return addresses[0]
    families = set()
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise ValueError(f"targets: {address!r} is not ip:port; list IP literals, or use one "
                             "dns:///name:port target for host names") from None
        if not port.isdigit():
            raise ValueError(f"targets: {address!r} has no port")
    if len(families) > 1:
        raise ValueError("targets: mixes IPv4 and IPv6 addresses; use one family")
    return f"ipv{families.pop()}:" + ",".join(addresses)


def open_channel(target: str, credentials: grpc.ChannelCredentials | None, separate: bool,
                 options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel with round_robin over every address ``target`` resolves to.

    ``separate`` gives the channel its own connections (not shared with other
    channels to the same target), so several channels mean several TCP streams.
    """
    merged = [
        ("grpc.service_config", _ROUND_ROBIN),
        ("grpc.max_receive_message_length", MAX_CHUNK_SIZE + MESSAGE_OVERHEAD),
        ("grpc.max_send_message_length", -1),
        # The SDK retries itself: gRPC's retries would buffer whole uploads, and resume nothing.
        ("grpc.enable_retries", 0),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if separate:
        merged.append(("grpc.use_local_subchannel_pool", 1))
    merged += list(options)
    if credentials is None:
        return grpc.insecure_channel(target, options=merged)
    return grpc.secure_channel(target, credentials, options=merged)
