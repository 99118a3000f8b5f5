"""The daemon's libvirt connection: event loop, keepalive, lifecycle events, loss.

As libvirt-python's event-test.py shows: register the default event loop
implementation before opening the connection and run it in its own thread;
set a keepalive so a dead libvirtd is noticed; a close callback says when the
connection is gone; deregister callbacks before closing. Callbacks run on the
event thread and only put events on a queue: the daemon's main thread owns
the store.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable

import libvirt

from ..core.launch.lifecycle import LIVE_CHANGE, LifecycleEvent
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
        self._callback_ids: list[int] = []

    def connect(self) -> None:
        """Open, keep alive, subscribe; raises LibvirtError when libvirtd is not there."""
        start_event_loop()
        try:
            conn = libvirt.open(self.uri)
            conn.setKeepAlive(5, 3)
            conn.registerCloseCallback(self._closed, None)
            self._callback_ids = [conn.domainEventRegisterAny(None, event_id, callback, None) for event_id, callback in (
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle),
                # Live changes the hook never sees (issue #13): hot-plug, unplug, balloon, tunables, metadata.
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._device("added")),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._device("removed")),
                (libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, self._balloon),
                (libvirt.VIR_DOMAIN_EVENT_ID_TUNABLE, self._tunable),
                (libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._metadata),
            )]
        except libvirt.libvirtError as err:
            raise LibvirtError(f"cannot subscribe to libvirt at {self.uri}: {err.get_error_message()}") from None
        self._conn = conn
        self.lost.clear()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self.lost.is_set()

    def _lifecycle(self, _conn: object, dom: libvirt.virDomain, event: int, detail: int, _opaque: object) -> None:
        self.events.put(LifecycleEvent(dom.UUIDString(), dom.name(), event, detail))

    def _change(self, dom: libvirt.virDomain, what: str) -> None:
        self.events.put(LifecycleEvent(dom.UUIDString(), dom.name(), LIVE_CHANGE, 0, what))

    def _device(self, how: str) -> Callable[[object, libvirt.virDomain, str, object], None]:
        def callback(_conn: object, dom: libvirt.virDomain, alias: str, _opaque: object) -> None:
            self._change(dom, f"device {alias} {how} while running")
        return callback

    def _balloon(self, _conn: object, dom: libvirt.virDomain, actual: int, _opaque: object) -> None:
        self._change(dom, f"memory balloon set to {actual} KiB while running")

    def _tunable(self, _conn: object, dom: libvirt.virDomain, params: dict[str, object], _opaque: object) -> None:
        self._change(dom, "tunables set while running: " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))

    def _metadata(self, _conn: object, dom: libvirt.virDomain, _kind: int, uri: str | None, _opaque: object) -> None:
        self._change(dom, f"metadata {uri or ''} changed".replace("  ", " "))

    def _closed(self, _conn: object, _reason: int, _opaque: object) -> None:
        self.lost.set()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        ids, self._callback_ids = self._callback_ids, []
        steps: list[Callable[[], object]] = [functools.partial(conn.domainEventDeregisterAny, i) for i in ids]
        for step in (*steps, conn.unregisterCloseCallback, conn.close):
            try:
                step()
            except libvirt.libvirtError:
                pass  # the connection is already gone
