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
    connected: bool
    detail: str

    def healthy(self, now_epoch: float, heartbeat_interval: int, alive: bool) -> bool:
        """Alive, connected to libvirt, and its heartbeat no older than three intervals."""
        return alive and self.connected and now_epoch - self.heartbeat_epoch < 3 * heartbeat_interval

    def to_json(self, now_epoch: float, healthy: bool) -> dict[str, object]:
        return {
            "pid": self.pid, "started_at": self.started_at, "heartbeat_at": self.heartbeat_at,
            "heartbeat_age_seconds": round(now_epoch - self.heartbeat_epoch, 1), "connected": self.connected,
            "detail": self.detail, "healthy": healthy,
        }
