"""A TCP proxy on 127.0.0.1 that breaks a connection part-way through, for tests of broken streams.

Bytes pass through unchanged. The first connection whose server-to-client
bytes reach ``cut_after`` is reset (both sockets closed with SO_LINGER 0, so
each peer sees a reset, as when a node dies or a load balancer drops a
connection); later connections pass untouched. With ``rate`` (bytes per
second) the server-to-client bytes are paced, so that a job through the proxy
is still running when a test acts on the server behind it.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

_BUFFER = 64 << 10


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class CuttingProxy:
    def __init__(self, upstream_port: int, cut_after: int | None, rate: float | None = None) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.rate = rate
        self.cuts = 0
        self.connections = 0  # client connections accepted
        self.downstream_bytes = 0  # server-to-client bytes forwarded, over every connection
        self.upstream_bytes = 0  # client-to-server bytes forwarded
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._closed:
                    _reset(client)
                    _reset(server)
                    return
                self.connections += 1
                self._sockets += [client, server]
            link = {"client": client, "server": server, "downstream": 0}
            threading.Thread(target=self._pump, args=(server, client, link, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, link, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, link: dict, downstream: bool) -> None:
        try:
            while True:
                data = source.recv(_BUFFER)
                if not data:
                    break
                if not downstream:
                    with self._lock:
                        self.upstream_bytes += len(data)
                else:
                    with self._lock:
                        cut = self.cut_after is not None and self.cuts == 0 and \
                            link["downstream"] + len(data) >= self.cut_after
                        if cut:
                            self.cuts += 1
                        else:
                            link["downstream"] += len(data)
                            self.downstream_bytes += len(data)
                    if cut:
                        _reset(link["client"])
                        _reset(link["server"])
                        return
                target.sendall(data)
                if downstream and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        self._listener.close()
        for sock in sockets:
            _reset(sock)
