"""How the gRPC server meets the network: TLS or plaintext, token authentication, keepalive and connection
age, and the plaintext health port for Kubernetes probes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from .auth import HEALTH_SERVICE, TokenAuthInterceptor, read_token_file
from .config import ConfigError, ServeConfig
from .tls import server_credentials

HEALTH_PORT_THREADS = 4


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def channel_options(config: ServeConfig) -> list[tuple[str, int]]:
    """Keepalive and connection-age settings of the gRPC server.

    The server pings idle connections every --keepalive-time and permits client
    pings every --keepalive-permit-time, with or without calls running (the SDK
    pings every 30 s, see nvfp4_prep.client.targets). After --max-connection-age
    it sends GOAWAY so that round_robin clients reconnect and re-resolve, and
    gives running calls --max-deadline, the longest any call may take, to finish.
    """
    options = [
        ("grpc.keepalive_time_ms", _ms(config.keepalive_time)),
        ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(config.keepalive_permit_time)),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if config.max_connection_age:
        options += [("grpc.max_connection_age_ms", _ms(config.max_connection_age)),
                    ("grpc.max_connection_age_grace_ms", _ms(config.max_deadline))]
    return options


def interceptors(config: ServeConfig) -> list[grpc.ServerInterceptor]:
    """The token check when --auth-token-file is set (health left open with --health-without-auth)."""
    if config.auth_token_file is None:
        return []
    open_services = (HEALTH_SERVICE,) if config.health_without_auth else ()
    return [TokenAuthInterceptor(read_token_file(config.auth_token_file), open_services)]


def listen(server: grpc.Server, config: ServeConfig) -> int:
    """Binds the gRPC port, with TLS when --tls-cert is set; returns the port bound."""
    address = f"{config.host}:{config.port}"
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            port = server.add_secure_port(address, server_credentials(config.tls_cert, config.tls_key,
                                                                      config.tls_client_ca))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as err:  # grpc's way of saying the address is taken or not this machine's
        raise ConfigError(f"--host/--port: cannot listen on {address} ({err})") from None
    if port == 0:
        raise ConfigError(f"--host/--port: cannot listen on {address}")
    return port


class HealthPort:
    """A second, plaintext gRPC server that serves only grpc.health.v1 (the main port's health servicer), for
    Kubernetes' gRPC probes, which speak neither TLS nor tokens. Nothing else is reachable through it."""

    def __init__(self, servicer: health.HealthServicer, host: str, port: int) -> None:
        self._pool = ThreadPoolExecutor(HEALTH_PORT_THREADS, thread_name_prefix="nvfp4-prep-health")
        self._server = grpc.server(self._pool, options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self._server)
        try:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as err:  # grpc's way of saying the port is taken
            self.stop(0)
            raise ConfigError(f"--health-port: cannot listen on {host}:{port} ({err})") from None

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None) -> None:
        self._server.stop(grace).wait()
        self._pool.shutdown(wait=True)
