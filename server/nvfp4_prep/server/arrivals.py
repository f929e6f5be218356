"""A streamed layer still arriving: the thread that receives it, and how far each of its tensors has got.

A call answered while its request arrives (``early_answer``) reads its chunks on a thread of its own, which lands
them as the whole-layer path does (``TensorReceiver`` checks, the worker's sink) and reports after each chunk how
many leading bytes of its tensor are in place (on CUDA, with an event the compute waits for on the device). The
answer waits on ``Arrivals`` for the experts it needs next. Whatever the receive raises (a bad chunk, a broken
stream) is raised to the answer at its next wait, and ends the call.

The thread ends when its chunks do, when the answer stops it (at the next chunk), or when the call ends (its
stream or bulk connections close). Until then it may still copy into the layer's buffers, so the call's memory
reservation is let go of by whichever of the two ends last.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import NoReturn

import grpc
import torch

from nvfp4_prep.wire import ChunkSink, TensorReceiver, TensorSpec

from .budget import Reservation
from .errors import CallCancelled

log = logging.getLogger(__name__)

# How often a wait for arrivals checks the call's deadline and cancellation.
POLL_SECONDS = 0.05


class Arrivals:
    """The tensors of a layer that arrives (``offer``, once known) and the leading bytes landed of each, written by
    the thread that receives (or reads) the layer and waited for by the answer. ``index``: each tensor's place."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] | None = None
        self.index: dict[str, int] = {}
        self._landed: list[int] = []
        self._event: torch.cuda.Event | None = None
        self._error: BaseException | None = None
        self._ended = False
        self._changed = threading.Condition()

    def offer(self, tensors: dict[str, torch.Tensor]) -> None:
        """The layer's tensors, by name, which fill as ``landed`` says."""
        with self._changed:
            self._tensors = tensors
            self.index = {name: place for place, name in enumerate(tensors)}
            self._landed = [0] * len(tensors)
            self._changed.notify_all()

    def tensors(self, check: Callable[[], None]) -> dict[str, torch.Tensor]:
        """Waits for ``offer``; raises the receive's error if it failed first."""
        with self._changed:
            while self._tensors is None:
                if self._error is not None:
                    self._raise()
                if self._ended:
                    raise ValueError("the receive ended without offering its tensors")
                self._changed.wait(POLL_SECONDS)
                check()
            return self._tensors

    def landed(self, index: int, end: int, event: torch.cuda.Event | None) -> None:
        """Bytes ``[0, end)`` of tensor ``index`` are in place once ``event`` (None: at once) completes, and so is
        everything reported before."""
        with self._changed:
            self._landed[index] = end
            self._event = event
            self._changed.notify_all()

    def ended(self, error: BaseException | None) -> None:
        """The receive finished (every announced byte landed) or failed with ``error``."""
        if error is not None:
            error.__traceback__ = None  # its frames would hold the receive's buffers for as long as the error lives
        with self._changed:
            self._error, self._ended = error, True
            self._changed.notify_all()

    def wait(self, index: int, nbytes: int, check: Callable[[], None]) -> tuple[int, torch.cuda.Event | None]:
        """Waits until ``nbytes`` leading bytes of tensor ``index`` landed; returns how many have, and the event
        after which they (and all reported before) are in place. ``check`` runs while waiting and may raise
        (deadline, cancellation); the receive's error is raised here."""
        with self._changed:
            while self._landed[index] < nbytes:
                if self._error is not None:
                    self._raise()
                if self._ended:  # finished without error: every announced byte landed, so nbytes was too many
                    raise ValueError(f"waited for {nbytes} bytes of tensor {index}, more than it has")
                self._changed.wait(POLL_SECONDS)
                check()
            return self._landed[index], self._event

    def finished(self, check: Callable[[], None]) -> None:
        """Waits until the receive ended; raises its error, if it failed."""
        with self._changed:
            while not self._ended:
                self._changed.wait(POLL_SECONDS)
                check()
            if self._error is not None:
                self._raise()

    def _raise(self) -> NoReturn:
        """Raises the receive's error, once: the answer ends with it. Neither this object nor this frame keeps it,
        since its traceback holds the answer's frames, which hold this object: a cycle that would keep the layer
        until the garbage collector ran."""
        error, self._error = self._error, None
        try:
            raise error
        finally:
            error = None


class Receiving:
    """Receives ``chunks`` into ``sink`` (whose tensors ``arrivals`` was offered, in ``specs`` order) on a thread of
    its own, reporting to ``arrivals``; ``stop`` ends it (at once when it has ended, else at its next chunk) and
    hands it ``reservation`` to release when it does."""

    def __init__(self, specs: Sequence[TensorSpec], sink: ChunkSink, chunks: Iterable, arrivals: Arrivals,
                 close_sink: Callable[[], None], timed: AbstractContextManager) -> None:
        self._timed = timed  # the "read" stage's timer
        self._receiver = TensorReceiver(specs, sink, "tensors")
        self._landed = getattr(sink, "landed", None)  # a device sink's event after its copies so far
        self._chunks = chunks
        self._arrivals = arrivals
        self._close_sink = close_sink
        self._lock = threading.Lock()
        self._stopped = False
        self._done = False
        self._reservation: Reservation | None = None
        self._thread = threading.Thread(target=self._run, name="nvfp4-prep-receive", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            with self._timed:
                for chunk in self._chunks:
                    if self._stopped:
                        break
                    data = self._receiver.add(chunk)
                    self._arrivals.landed(chunk.tensor_index, chunk.offset + len(data),
                                          self._landed() if self._landed is not None else None)
                else:
                    self._receiver.finish()
        except grpc.RpcError as err:  # the client went away. grpc keeps this error: its traceback, whose frames
            err.__traceback__ = None  # hold this receive's buffers, would keep them, and raised again, the answer's
            error = CallCancelled("client went away while sending its layer")
        except BaseException as err:  # the answer raises it at its next wait
            error = err
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()  # a bulk channel's readers stop at once
            self._close_sink()
            self._arrivals.ended(error)
            with self._lock:
                self._done = True
                reservation, self._reservation = self._reservation, None
            if reservation is not None:
                reservation.release()

    def stop(self, reservation: Reservation) -> None:
        """Ends the receive; ``reservation`` is released now if it has ended, else when it does."""
        with self._lock:
            self._stopped = True
            if not self._done:
                self._reservation = reservation
                log.debug("receive still running as its answer ended; it keeps the call's reservation until it ends")
                return
        reservation.release()
