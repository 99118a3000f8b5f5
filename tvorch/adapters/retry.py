"""The one place tvorch retries: libvirt calls that failed for a transient reason, and Keylime submissions.

libvirtd restarting, a domain's state-change lock held by another job, an RPC
connection reset: these clear up within seconds. Everything else (no such
domain, invalid XML, operation not valid in this state) is final at once.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import libvirt
from tenacity import retry, retry_if_exception, retry_if_exception_type, stop_after_attempt, wait_exponential

from ..errors import KeylimeUnreachable

T = TypeVar("T")

_TRANSIENT_CODES = {
    libvirt.VIR_ERR_OPERATION_TIMEOUT,  # "cannot acquire state change lock"
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
}


def is_transient(exc: BaseException) -> bool:
    if not isinstance(exc, libvirt.libvirtError):
        return False
    code, domain = exc.get_error_code(), exc.get_error_domain()
    if code in _TRANSIENT_CODES:
        return True
    # Socket gone or reset while libvirtd restarts.
    return code == libvirt.VIR_ERR_SYSTEM_ERROR and domain == libvirt.VIR_FROM_RPC


def libvirt_retry(func: Callable[..., T]) -> Callable[..., T]:
    """Retry FUNC on transient libvirt errors: 5 tries over about 3 s (a libvirtd restart)."""
    return retry(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(5),
        wait=wait_exponential(multiplier=0.2, max=2),
        reraise=True,
    )(func)


def keylime_retry(func: Callable[..., T]) -> Callable[..., T]:
    """Retry FUNC while the Keylime verifier is unreachable: 3 tries over about 1 s (a verifier of the pool
    restarting); past that the caller queues the submission and the daemon tries again with backoff
    (keylime_backoff)."""
    return retry(
        retry=retry_if_exception_type(KeylimeUnreachable),
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.25, max=1),
        reraise=True,
    )(func)


def keylime_backoff(attempts: int, base: float = 30.0, cap: float = 3600.0) -> float:
    """Seconds before the queued submission's next try after ATTEMPTS failed ones: doubling, capped."""
    return float(min(cap, base * 2 ** max(0, attempts - 1)))
