"""Leases with live owners: how long a claim or a poll lease lasts, and the heartbeat
that renews every lease of this process while it works.

A lease is short so that a process that died (SIGKILL, OOM) or froze (SIGSTOP, a node
lost without a word) loses what it held within half a minute: the first poll that
starts a minute later takes it over. A live process renews its leases every
`HEARTBEAT_SECONDS`, so a slow send is never taken over while its owner lives.
"""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Protocol

from worker.errors import StoreError
from worker.models import DEFAULT_LEASE_SECONDS

log = logging.getLogger(__name__)

LEASE_SECONDS = DEFAULT_LEASE_SECONDS
# A third of the lease: two renewals may fail (a database that is briefly away) before
# the lease runs out.
HEARTBEAT_SECONDS = 10.0


def new_owner() -> str:
    """A token naming one process run as the owner of its leases; random, so that no
    other process, on this host or another, can ever hold the same."""
    return secrets.token_hex(16)


class Renewer(Protocol):
    def renew(self, owner: str, *, lease_seconds: float) -> int:
        """Extend every unexpired lease `owner` holds; returns how many."""


class Heartbeat:
    """Renews `owner`'s leases every `interval` seconds in a thread of its own, until
    `stop()`. A renewal that fails is logged and tried again at the next beat."""

    def __init__(
        self,
        store: Renewer,
        owner: str,
        *,
        lease_seconds: float = LEASE_SECONDS,
        interval: float = HEARTBEAT_SECONDS,
    ) -> None:
        if not 0 < interval < lease_seconds:
            raise ValueError("the heartbeat must beat more often than a lease lasts")
        self._store = store
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._interval = interval
        self._stopped = threading.Event()
        # A daemon: the heartbeat must never keep a stopping process alive.
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _beat(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self._store.renew(self._owner, lease_seconds=self._lease_seconds)
            except StoreError as exc:
                log.warning(
                    "renewing the leases failed (tried again in %.0f s): %s",
                    self._interval,
                    exc,
                    extra={"action": "lease_renew_failed"},
                )
