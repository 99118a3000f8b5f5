"""`tvorch serve`: the node service that keeps tvorch's view of the node true.

It follows every instance's lifecycle through libvirt's events (also starts,
stops and crashes that happen outside tvorch), reconciles the store with
libvirt on every (re)connect, attests the host on a schedule so the hook
always finds a fresh verdict, removes vTPM secrets an interrupted start left
in libvirtd, and reports to systemd (READY, WATCHDOG, STATUS). It starts the
autostart instances and resumes saved ones when it starts, and on SIGTERM saves
or shuts down the running ones (serve.on_shutdown, service.startpaths) before
it stops; SIGHUP reloads the configuration (a new `libvirt_uri` included).
One daemon per store: it holds `<state_dir>/serve.lock` while it runs.

One main thread owns the store and does all the work; libvirt's event loop
runs on its own thread and only queues events.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import signal
import time
from pathlib import Path
from types import FrameType

from tenacity import RetryCallState, Retrying, wait_exponential

from .adapters.libvirt_events import LifecycleFeed
from .adapters.locks import StoreLock
from .adapters.sdnotify import notify, watchdog_interval
from .config import Config, load_config
from .core.launch.lifecycle import LifecycleEvent, follows_libvirt, interpret, is_boot
from .core.timestamps import utc_now
from .errors import ConflictError, TvorchError
from .logs import configure_logging, get_logger
from .service.node import Node

log = get_logger(__name__)


class Daemon:
    def __init__(self, config_path: str | None, log_level: str | None = None) -> None:
        self.config_path = config_path
        self.cfg: Config = load_config(config_path)
        # A service's journal wants its routine events: info unless told otherwise.
        configure_logging(log_level or ("debug" if self.cfg.log_level == "debug" else "info"))
        self.lock = StoreLock(Path(self.cfg.state_dir))  # before anything is written
        self.node = Node(self.cfg)
        self.events: queue.Queue[LifecycleEvent] = queue.Queue()
        self.feed = LifecycleFeed(self.cfg.libvirt_uri, self.events)
        self.started_at = utc_now()
        self.stopping = False
        self.reload_requested = False
        # tenacity computes the backoff; the loop keeps running (heartbeat, watchdog) between attempts.
        self._backoff = wait_exponential(multiplier=0.5, max=self.cfg.serve.reconnect_max_wait)
        self._attempt = 0
        self._next_connect = 0.0
        self._next_attest = 0.0
        self._next_keylime = 0.0
        self._next_heartbeat = 0.0
        self._next_watchdog = 0.0
        self._warned_no_policy = False
        # Node start (README, "Start paths"): autostart instances and saved ones, once, in a thread.
        self._boot_starts: threading.Thread | None = None
        self._boot_waiting_logged = False

    # -- signals -------------------------------------------------------------

    def _on_term(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload_requested = True

    # -- the loop --------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        log.info("serve_starting", pid=os.getpid(), config=self.cfg.source)
        ready = False
        while not self.stopping:
            now = time.monotonic()
            if self.reload_requested:
                self._reload()
            if not self.feed.connected and now >= self._next_connect:
                self._connect()
                if self.feed.connected:
                    self._heartbeat(time.monotonic())  # `tvorch status` is healthy once systemd hears READY
                if self.feed.connected and not ready:
                    notify("READY=1", "STATUS=following libvirt")
                    ready = True
            self._drain_events(timeout=0.5)
            self._periodic(time.monotonic())
        notify("STOPPING=1")
        self._host_shutdown()
        self.feed.close()
        self.node.store.daemon_heartbeat(os.getpid(), self.started_at, False, "stopped", self.feed.uri)
        self.node.close()
        self.lock.release()
        log.info("serve_stopped")
        return 0

    def _connect(self) -> None:
        if self.feed.lost.is_set():
            log.warning("libvirt_connection_lost", uri=self.cfg.libvirt_uri)
            self.feed.close()
            self.node.reset_hypervisor()
        try:
            self.feed.connect()
        except TvorchError as err:
            self._attempt += 1
            state = RetryCallState(Retrying(), None, (), {})
            state.attempt_number = self._attempt
            delay = self._backoff(state)
            self._next_connect = time.monotonic() + delay
            log.warning("libvirt_unreachable", error=str(err), retry_in=round(delay, 1))
            notify(f"STATUS=waiting for libvirtd (retry in {delay:.0f} s)")
            return
        self._attempt = 0
        log.info("libvirt_connected", uri=self.cfg.libvirt_uri)
        self._reconcile()

    def _reconcile(self) -> None:
        from .service.reconcile import reconcile

        try:
            for line in reconcile(self.node):
                log.info("reconciled", action=line)
        except TvorchError as err:
            log.error("reconcile_failed", error=str(err))

    def _drain_events(self, timeout: float) -> None:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._record(event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return

    def _record(self, event: LifecycleEvent) -> None:
        """Bring the instance's record in line with what libvirt just reported."""
        record = self.node.store.by_uuid(event.uuid)
        if record is None:
            return  # not one of ours
        if event.change is not None:  # the running configuration changed: the hook never sees it (#13)
            try:
                self.node.store.add_event(record.id, "live-change", event.change)
            except TvorchError as err:
                log.error("record_failed", name=record.name, error=str(err))
            log.warning("live_change", name=record.name, change=event.change)
            return
        state, why = interpret(event.event, event.detail)
        if is_boot(event.event, event.detail):
            self._watch_boot(record.name)
        try:
            if state is None or state is record.state or not follows_libvirt(record.state):
                self.node.store.add_event(record.id, "libvirt", why)
            else:
                self.node.store.update_instance(record.id, state=state, event=("libvirt", why))
                log.info("instance_state", name=record.name, state=state.value, why=why)
        except TvorchError as err:
            log.error("record_failed", name=record.name, error=str(err))

    def _watch_boot(self, name: str) -> None:
        """Attest the new boot once its agent answers, in a thread of its own (its own store connection)."""
        cfg = self.cfg

        def watch() -> None:
            import secrets

            from .service import keylime
            from .service.attest import attest_guest

            node = Node(cfg)
            deadline = time.monotonic() + cfg.guest.agent_timeout
            try:
                while True:
                    try:
                        nonce = secrets.token_bytes(32)
                        done = attest_guest(node, name, nonce)
                        break
                    except ConflictError:  # the launch that started it has not recorded it yet
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(1)
                summary = done.summary()
                log.info("guest_boot_attested", name=name, baseline=summary["baseline"],
                         differences=summary["differences"])
                keylime.submit_guest(node, done, nonce)  # verified above; queued if Keylime is not reached
            except TvorchError as err:
                log.warning("guest_boot_not_attested", name=name, error=str(err))
            finally:
                node.close()

        threading.Thread(target=watch, name=f"attest-{name}", daemon=True).start()

    def _periodic(self, now: float) -> None:
        interval = watchdog_interval()
        if interval and now >= self._next_watchdog:
            notify("WATCHDOG=1")
            self._next_watchdog = now + interval
        if now >= self._next_heartbeat:
            self._heartbeat(now)
        if self.cfg.serve.attest_interval and now >= self._next_attest:
            self._attest()
            self._next_attest = now + self.cfg.serve.attest_interval
        if self.cfg.keylime.verifier_url and now >= self._next_keylime:
            self._retry_keylime()
            self._next_keylime = now + 10
        if self._boot_starts is None and self.feed.connected:
            self._start_boot_instances()

    # -- start paths (service.startpaths) ------------------------------------

    def _start_boot_instances(self) -> None:
        """Once, after the first reconcile and (policy.host_verdict = "require") a passing, fresh host
        verdict: start the autostart instances and resume the saved ones, serve.start_concurrency at a
        time, in a thread of its own so the loop keeps answering the watchdog."""
        if self.cfg.policy.host_verdict == "require":
            from .core.attestation.hostverdict import host_problem

            problem = host_problem(self.node.store.latest_host_verdict(), time.time(), self.cfg.host.verdict_max_age)
            if problem is not None:
                if not self._boot_waiting_logged:
                    log.warning("node_start_waiting", reason=problem)
                    self._boot_waiting_logged = True
                return
        cfg = self.cfg

        def run() -> None:
            from .service.startpaths import boot_starts

            node = Node(cfg)
            try:
                for done in boot_starts(node):
                    (log.error if done.done == "failed" else log.info)("node_start", **done.to_json())
            except TvorchError as err:
                log.error("node_start_failed", error=str(err))
            finally:
                node.close()

        self._boot_starts = threading.Thread(target=run, name="node-start", daemon=True)
        self._boot_starts.start()

    def _host_shutdown(self) -> None:
        """serve.on_shutdown on SIGTERM: save or shut down every running instance through tvorch (the
        vTPM states ledgered), before libvirtd stops (the unit's ordering). Under systemd only when the
        host is going down: `systemctl restart/stop tvorch` leaves the guests running."""
        how = self.cfg.serve.on_shutdown
        if how == "none" or not self.feed.connected:
            return
        if os.environ.get("INVOCATION_ID") and not _system_stopping():
            log.info("guests_left_running", reason="the service stops, the host does not")
            return
        if self._boot_starts is not None:
            self._boot_starts.join()
        from .service.startpaths import host_shutdown

        notify(f"STATUS=stopping: {how} of every running instance")
        try:
            for done in host_shutdown(self.node, how):
                (log.error if done.done == "failed" else log.info)("host_shutdown", **done.to_json())
        except TvorchError as err:
            log.error("host_shutdown_failed", error=str(err))

    def _heartbeat(self, now: float) -> None:
        """The row `tvorch status` judges; then take back vTPM keys that interrupted starts left lent."""
        uri = self.feed.uri  # the connection it follows, not merely the URI configured
        detail = f"connected to libvirt at {uri}" if self.feed.connected else f"waiting for libvirtd at {uri}"
        try:
            self.node.store.daemon_heartbeat(os.getpid(), self.started_at, self.feed.connected, detail, uri)
        except TvorchError as err:
            log.error("heartbeat_failed", error=str(err))
        if self.feed.connected:
            self._drop_stale_secrets()
        self._next_heartbeat = now + self.cfg.serve.heartbeat_interval

    def _drop_stale_secrets(self) -> None:
        """A start killed while libvirtd held its vTPM key leaves the key lent: take it back within a
        heartbeat, not only at the next (re)connect. One listing of libvirt's secrets when none is left."""
        from .service.vtpm import drop_stale_secrets

        try:
            for line in drop_stale_secrets(self.node):
                log.warning("reconciled", action=line)
        except TvorchError as err:
            log.error("secret_sweep_failed", error=str(err))

    def _attest(self) -> None:
        if not Path(self.cfg.host.policy).exists():
            if not self._warned_no_policy:
                log.warning("host_attestation_skipped", reason=f"no host policy at {self.cfg.host.policy}")
                self._warned_no_policy = True
            return
        from .service import host as host_service  # tpm2-pytss only when attestation runs

        try:
            verdict = host_service.attest(self.cfg, self.node.store)
        except TvorchError as err:
            log.error("host_attestation_error", error=str(err))
            notify(f"STATUS=host attestation error: {err}")
            return
        if self.cfg.keylime.verifier_url:
            self._submit_host_quote(verdict.quote_json)
        if verdict.passed:
            log.info("host_attestation_passed")
            notify("STATUS=following libvirt; host verdict passed")
        else:  # attest() already logged every failure
            notify(f"STATUS=HOST VERDICT FAILED ({len(verdict.failures)} failures)")

    def _retry_keylime(self) -> None:
        """Queued Keylime submissions whose backoff has passed (service.keylime.retry_pending)."""
        from .service import keylime

        try:
            done = keylime.retry_pending(self.node)
        except TvorchError as err:
            log.error("keylime_retry_failed", error=str(err))
            return
        if done:
            log.info("keylime_submitted_from_queue", count=done)

    def _submit_host_quote(self, quote_json: str) -> None:
        from .core.attestation.quote import HostQuote
        from .service import keylime

        try:
            keylime.submit_host(self.node, HostQuote.from_json(json.loads(quote_json)))
        except (TvorchError, ValueError) as err:
            log.error("keylime_host_submission_failed", error=str(err))

    def _reload(self) -> None:
        self.reload_requested = False
        notify("RELOADING=1")
        try:
            cfg = load_config(self.config_path)
            # Another store: hold it before letting go of this one (refused if a daemon holds it).
            lock = StoreLock(Path(cfg.state_dir)) if cfg.state_dir != self.cfg.state_dir else self.lock
        except TvorchError as err:
            log.error("reload_failed", error=str(err))
        else:
            if lock is not self.lock:
                self.lock.release()
                self.lock = lock
            if cfg.libvirt_uri != self.cfg.libvirt_uri:
                # The feed is bound to its URI: drop it and connect to the new one at once.
                log.info("libvirt_uri_changed", old=self.cfg.libvirt_uri, new=cfg.libvirt_uri)
                self.feed.close()
                self.feed = LifecycleFeed(cfg.libvirt_uri, self.events)
                self._attempt, self._next_connect = 0, 0.0
            self.node.close()
            self.cfg, self.node = cfg, Node(cfg)
            self._backoff = wait_exponential(multiplier=0.5, max=cfg.serve.reconnect_max_wait)
            self._warned_no_policy = False
            self._next_attest = self._next_heartbeat = 0.0
            log.info("config_reloaded", config=cfg.source)
        notify("READY=1")


def _system_stopping() -> bool:
    """Whether systemd is taking the host down (not merely this service)."""
    import subprocess

    try:
        state = subprocess.run(["systemctl", "is-system-running"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: act as told, the guests' states are ledgered either way
    return state.stdout.strip() == "stopping"


def serve(config_path: str | None, log_level: str | None = None) -> int:
    return Daemon(config_path, log_level).run()
