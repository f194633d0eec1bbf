"""The per-step control channel between the engine and its shard workers: TCP sockets.

The driver listens on a port chosen at run time; each worker connects once and then serves
steps on a background thread: receive the pickled SchedulerOutput, execute, reply. Every rank
replies (rank 0 with the sampled tokens, the others with an empty acknowledgement or their
error), so the driver knows each step finished everywhere, and a worker that dies closes its
socket: the driver sees it at once instead of waiting on a peer stuck in a collective.
Blocking reads: an idle instance uses no CPU (Ray compiled graphs spin a core per actor).
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

_HEADER = struct.Struct("!Q")


class ChannelClosedError(ConnectionError):
    """The peer closed the connection (its process died or shut down)."""


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        n = sock.recv_into(view[received:], size - received)
        if n == 0:
            raise ChannelClosedError("the peer closed the step channel")
        received += n
    return bytes(buffer)


def _recv(sock: socket.socket) -> bytes:
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    return _recv_exactly(sock, size)


def _configure(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class StepChannelServer:
    """Driver side: one connection per rank, in rank order."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen()
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []

    def accept(self, world_size: int, timeout_s: float) -> None:
        """Wait for every rank to connect; each first sends its rank."""
        self._listener.settimeout(timeout_s)
        by_rank: dict[int, socket.socket] = {}
        while len(by_rank) < world_size:
            conn, _ = self._listener.accept()
            _configure(conn)
            conn.settimeout(timeout_s)
            rank = pickle.loads(_recv(conn))
            by_rank[rank] = conn
        self._conns = [by_rank[r] for r in range(world_size)]
        self._listener.close()

    def step(
        self, message: Any, timeout_s: float | None, first_rank_message: Any = None
    ) -> list[Any]:
        """Send `message` to every rank (rank 0 gets `first_rank_message` instead, when given);
        return each rank's reply (raises on a dead rank)."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        first_payload = payload
        if first_rank_message is not None:
            first_payload = pickle.dumps(first_rank_message, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self._conns):
            _send(conn, first_payload if rank == 0 else payload)
        replies = []
        for conn in self._conns:
            conn.settimeout(timeout_s)
            replies.append(pickle.loads(_recv(conn)))
        return replies

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns = []
        self._listener.close()


class StepChannelWorker:
    """Worker side: a daemon thread that serves steps until the driver hangs up."""

    def __init__(self, address: str, rank: int, handler: Callable[[Any], Any]) -> None:
        host, port = address.rsplit(":", 1)
        self._sock = socket.create_connection((host, int(port)), timeout=60)
        self._sock.settimeout(None)  # block between steps: an idle engine costs no CPU
        _configure(self._sock)
        _send(self._sock, pickle.dumps(rank))
        self._handler = handler
        self._thread = threading.Thread(
            target=self._serve, name=f"step-channel-{rank}", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        try:
            while True:
                message = pickle.loads(_recv(self._sock))
                try:
                    reply: Any = self._handler(message)
                except Exception as exc:  # report it; the driver decides the instance is dead
                    reply = StepFailure(f"{type(exc).__name__}: {exc}")
                _send(self._sock, pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        except (ChannelClosedError, OSError):
            return  # the driver shut down


class StepFailure:
    """A rank's step raised; carried back to the driver as the reply."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"StepFailure({self.message!r})"
