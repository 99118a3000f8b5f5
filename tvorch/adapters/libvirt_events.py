"""The daemon's libvirt connection: event loop, keepalive, lifecycle events, loss.

As libvirt-python's event-test.py shows: register the default event loop
implementation before opening the connection and run it in its own thread;
set a keepalive so a dead libvirtd is noticed; a close callback says when the
connection is gone; deregister callbacks before closing. Callbacks run on the
event thread and only put events on a queue: the daemon's main thread owns
the store.
"""

from __future__ import annotations

import queue
import threading

import libvirt

from ..core.lifecycle import LifecycleEvent
from ..errors import LibvirtError

_loop_lock = threading.Lock()
_loop_started = False


def start_event_loop() -> None:
    """Once per process, before any connection is opened."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


class LifecycleFeed:
    def __init__(self, uri: str, events: "queue.Queue[LifecycleEvent]") -> None:
        self.uri = uri
        self.events = events
        self.lost = threading.Event()
        self._conn: libvirt.virConnect | None = None
        self._callback_id: int | None = None

    def connect(self) -> None:
        """Open, keep alive, subscribe; raises LibvirtError when libvirtd is not there."""
        start_event_loop()
        try:
            conn = libvirt.open(self.uri)
            conn.setKeepAlive(5, 3)
            conn.registerCloseCallback(self._closed, None)
            self._callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
            )
        except libvirt.libvirtError as err:
            raise LibvirtError(f"cannot subscribe to libvirt at {self.uri}: {err.get_error_message()}") from None
        self._conn = conn
        self.lost.clear()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self.lost.is_set()

    def _lifecycle(self, _conn: object, dom: libvirt.virDomain, event: int, detail: int, _opaque: object) -> None:
        self.events.put(LifecycleEvent(dom.UUIDString(), dom.name(), event, detail))

    def _closed(self, _conn: object, _reason: int, _opaque: object) -> None:
        self.lost.set()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for step in (lambda: conn.domainEventDeregisterAny(self._callback_id),
                     conn.unregisterCloseCallback, conn.close):
            try:
                step()
            except libvirt.libvirtError:
                pass  # the connection is already gone
