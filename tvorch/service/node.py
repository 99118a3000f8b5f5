"""The node as the use cases see it: the store and the libvirt connection.

Every service function takes a Node, so the CLI, the daemon and the tests
share one way of opening (lazily) and closing both.
"""

from __future__ import annotations

from ..adapters.hypervisor import Hypervisor
from ..adapters.store import Store
from ..config import Config


class Node:
    """The store and the libvirt connection, opened on first use and closed once."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._store: Store | None = None
        self._hv: Hypervisor | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.cfg.db_path)
        return self._store

    @property
    def hypervisor(self) -> Hypervisor:
        if self._hv is None:
            self._hv = Hypervisor(self.cfg.libvirt_uri)
        return self._hv

    def connect(self) -> None:
        """Open the libvirt connection now: a use case that will need it refuses an unreachable libvirt
        before it writes anything (the store, a lock file)."""
        self.hypervisor  # noqa: B018 - the property opens it

    def reset_hypervisor(self) -> None:
        """Drop the libvirt connection (libvirtd restarted); the next use opens a new one."""
        if self._hv is not None:
            self._hv.close()
            self._hv = None

    def close(self) -> None:
        if self._hv is not None:
            self._hv.close()
        if self._store is not None:
            self._store.close()
