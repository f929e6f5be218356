"""Turning the SDK's ``targets`` into gRPC channels that spread calls over replicas."""

from __future__ import annotations

import ipaddress
import json
from typing import Sequence

import grpc

from nvfp4_prep.wire import MAX_CHUNK_SIZE, MESSAGE_OVERHEAD

_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


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
        ("grpc.enable_retries", 0),
    ]
    if separate:
        merged.append(("grpc.use_local_subchannel_pool", 1))
    merged += list(options)
    if credentials is None:
        return grpc.insecure_channel(target, options=merged)
    return grpc.secure_channel(target, credentials, options=merged)
