"""What `tvorch status` reports: the host verdict (also judged by the hook) and the daemon's heartbeat."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HostVerdict:
    at: str  # ISO-8601 UTC
    at_epoch: float  # the same moment, for cheap freshness checks
    passed: bool
    failures: tuple[str, ...]  # every failure, not only the first
    policy_digest: str  # sha256 of the host policy file judged against
    quote_json: str  # the HostQuote it was judged on

    def to_json(self, now_epoch: float) -> dict[str, object]:
        return {
            "at": self.at, "passed": self.passed, "failures": list(self.failures),
            "policy_digest": self.policy_digest, "age_seconds": round(now_epoch - self.at_epoch, 1),
        }


def host_problem(verdict: HostVerdict | None, now_epoch: float, max_age: int) -> str | None:
    """Why the host verdict does not allow a start, or None when it does."""
    if verdict is None:
        return "no host attestation verdict on this node (run tvorch host attest)"
    if not verdict.passed:
        first = "; ".join(verdict.failures[:3]) + (" ..." if len(verdict.failures) > 3 else "")
        return f"host attestation failed at {verdict.at}: {first}"
    age = now_epoch - verdict.at_epoch
    if age > max_age:
        return f"host verdict is {age:.0f} s old, older than host.verdict_max_age ({max_age} s)"
    return None


@dataclass(frozen=True)
class DaemonStatus:
    pid: int
    started_at: str
    heartbeat_at: str
    heartbeat_epoch: float
    connected: bool  # as the daemon last wrote it: stays 1 in the row of a daemon that was killed
    detail: str
    libvirt_uri: str | None = None  # the connection it follows (None: written before tvorch recorded it)

    def problem(self, now_epoch: float, heartbeat_interval: int, alive: bool) -> str | None:
        """Why the daemon is not healthy, or None: it must be alive, beat within three heartbeat
        intervals (a hung or killed daemon stops beating; a reused pid still fails this) and be connected."""
        age = now_epoch - self.heartbeat_epoch
        if not alive:
            return f"not running (pid {self.pid} is gone)"
        if age >= 3 * heartbeat_interval:
            return f"heartbeat {age:.0f} s old, beyond 3 x serve.heartbeat_interval ({3 * heartbeat_interval} s)"
        if not self.connected:
            return self.detail
        return None

    def healthy(self, now_epoch: float, heartbeat_interval: int, alive: bool) -> bool:
        return self.problem(now_epoch, heartbeat_interval, alive) is None

    def to_json(self, now_epoch: float, healthy: bool, problem: str | None = None) -> dict[str, object]:
        return {
            "pid": self.pid, "started_at": self.started_at, "heartbeat_at": self.heartbeat_at,
            "heartbeat_age_seconds": round(now_epoch - self.heartbeat_epoch, 1),
            # Only a healthy daemon is connected: the row of a dead one still says what it last saw.
            "connected": self.connected and healthy,
            "libvirt_uri": self.libvirt_uri, "detail": self.detail, "healthy": healthy, "problem": problem,
        }
