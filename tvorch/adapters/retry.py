"""The one place tvorch retries: libvirt calls that failed for a transient reason.

libvirtd restarting, a domain's state-change lock held by another job, an RPC
connection reset: these clear up within seconds. Everything else (no such
domain, invalid XML, operation not valid in this state) is final at once.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import libvirt
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

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
