"""The node service: `tvorch serve` (the daemon) and `tvorch status`."""

from __future__ import annotations

import os
import time


from ..errors import DaemonUnhealthy
from .common import Context, emit, json_option, pass_ctx
from .group import cli


@cli.command()
@pass_ctx
def serve(ctx: Context) -> None:
    """Run the node service (systemd: Type=notify); SIGTERM stops, SIGHUP reloads."""
    from ..daemon import serve as run_daemon

    raise SystemExit(run_daemon(ctx.config_path, "debug" if ctx.debug else "info" if ctx.verbose else None))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@cli.command()
@json_option
@pass_ctx
def status(ctx: Context, as_json: bool) -> None:
    """The daemon's health, the host verdict and instances by state; exit 16 unless the daemon is healthy."""
    store, cfg, now = ctx.node.store, ctx.node.cfg, time.time()
    daemon = store.daemon_status()
    problem = "never ran (tvorch serve)" if daemon is None else daemon.problem(
        now, cfg.serve.heartbeat_interval, _alive(daemon.pid))
    healthy = problem is None
    verdict = store.latest_host_verdict()
    counts = store.count_by_state()
    doc = {
        "daemon": daemon.to_json(now, healthy, problem) if daemon else None,
        "host_verdict": verdict.to_json(now) if verdict else None,
        "instances": counts,
    }
    from ..service.keylime import pending  # Keylime submissions waiting for an unreachable verifier

    keylime = pending(cfg)
    if keylime["enabled"] or keylime["pending"]:
        doc["keylime"] = keylime
    lines = [
        "daemon:    never ran (tvorch serve)" if daemon is None else
        f"daemon:    healthy, pid {daemon.pid}, {daemon.detail}, heartbeat {now - daemon.heartbeat_epoch:.0f} s ago"
        if healthy else f"daemon:    NOT HEALTHY: {problem}; pid {daemon.pid}, last heartbeat "
                        f"{now - daemon.heartbeat_epoch:.0f} s ago",
        "host:      no verdict yet" if verdict is None else
        f"host:      {'passed' if verdict.passed else 'FAILED'} {now - verdict.at_epoch:.0f} s ago",
        "instances: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"),
    ]
    if "keylime" in doc:
        lines.append("keylime:   " + ("all submissions answered" if not keylime["pending"] else
                                      f"{keylime['pending']} submission(s) waiting since {keylime['oldest']}: "
                                      f"{keylime['last_error']}")
                     + ("" if not keylime["host"] else
                        f"; host quote {'valid' if keylime['host']['valid'] else 'INVALID'} at {keylime['host']['at']}"))
    emit(as_json, doc, "\n".join(lines))
    if problem is not None:  # for monitoring: the report above, then a code of its own
        raise DaemonUnhealthy(f"tvorch serve is not healthy: {problem}")
