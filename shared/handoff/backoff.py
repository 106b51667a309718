"""Which peers a transport's setup may be tried with: a peer whose setup failed is not tried on
every request.

After k failures in a row a peer waits first_s * 2^(k-1) seconds (at most max_s) before the
next try, and after max_failures it is not tried again (its endpoint changes when the peer
restarts). While a peer is unproven (never set up, or its last setup failed), one setup runs at
a time: callers that come meanwhile wait for its outcome instead of each trying their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Peer:
    failures: int = 0  # in a row
    retry_at: float = 0.0  # the clock's time before which it is not tried
    proven: bool = False  # its last setup succeeded
    trying: bool = False  # a setup with it is running
    error: str = ""  # why the last setup failed


class SetupBackoff:
    def __init__(
        self, first_s: float = 1.0, max_s: float = 60.0, max_failures: int = 5,
        wait_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.first_s, self.max_s, self.max_failures = first_s, max_s, max_failures
        self.wait_s = wait_s  # longest wait for another caller's setup
        self.clock = clock  # the back-off's time, in seconds
        self._peers: dict[str, _Peer] = {}
        self._cond = threading.Condition()
        self.attempts = 0  # setups allowed so far (all peers)

    def acquire(self, key: str) -> str:
        """'' if the caller may set up `key` now (then it must call release), else why not."""
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            peer = self._peers.setdefault(key, _Peer())
            while True:
                if why := self._refused(peer):
                    return why
                if peer.proven:
                    break
                if not peer.trying:
                    peer.trying = True
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"another setup with {key} is still running"
                self._cond.wait(left)
            self.attempts += 1
            return ""

    def release(self, key: str, error: str = "") -> None:
        """The outcome of a setup acquire() allowed: '' if it worked, else why not."""
        with self._cond:
            peer = self._peers.setdefault(key, _Peer())
            peer.trying = False
            if error:
                peer.failures += 1
                peer.proven, peer.error = False, error
                delay = min(self.first_s * 2 ** (peer.failures - 1), self.max_s)
                peer.retry_at = self.clock() + delay
            else:
                peer.failures, peer.proven, peer.error = 0, True, ""
            self._cond.notify_all()

    def _refused(self, peer: _Peer) -> str:
        if peer.failures >= self.max_failures:
            return f"not tried again after {peer.failures} failed setups (last: {peer.error})"
        if (left := peer.retry_at - self.clock()) > 0:
            return f"retried in {left:.1f} s after {peer.failures} failed setups ({peer.error})"
        return ""
