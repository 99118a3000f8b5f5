"""The libvirt connection: the only module that talks to libvirtd.

Every call is retried for transient errors (see ``retry``) and every final
libvirt error becomes a one-line ``LibvirtError``.
"""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import libvirt

from ..core.launch.instance import InstanceState
from ..core.launch.metadata import METADATA_NAMESPACE
from ..errors import LibvirtError, NotFoundError, OperationTimeout
from ..logs import get_logger
from .retry import libvirt_retry

log = get_logger(__name__)
T = TypeVar("T")

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: InstanceState.RUNNING,
    libvirt.VIR_DOMAIN_RUNNING: InstanceState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: InstanceState.RUNNING,
    libvirt.VIR_DOMAIN_SHUTDOWN: InstanceState.RUNNING,  # shutting down, still running
    libvirt.VIR_DOMAIN_PAUSED: InstanceState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: InstanceState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: InstanceState.STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: InstanceState.CRASHED,
}


@dataclass(frozen=True)
class DomainInfo:
    """One libvirt domain as reconciliation sees it."""

    name: str
    uuid: str
    state: InstanceState
    instance_id: str | None  # from tvorch's <metadata>; None: tvorch did not launch it


def _message(err: libvirt.libvirtError) -> str:
    return err.get_error_message() or str(err)


def _silence_default_handler(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we report our own line."""


def _instance_id(element: str | None) -> str | None:
    """The id in tvorch's metadata element as libvirt returns it; None if absent or unreadable."""
    if element is None:
        return None
    try:
        return ET.fromstring(element).get("id") or None
    except ET.ParseError:
        return None


# How long reconcile waits for another node's libvirt to say whether it runs a domain.
REMOTE_PROBE_SECONDS = 15.0


def remote_domain_running(uri: str, uuid: str, timeout: float = REMOTE_PROBE_SECONDS) -> bool | None:
    """Whether libvirt at URI runs a domain with UUID; None when it cannot say within TIMEOUT seconds.

    libvirt's client has no connect timeout: a node that accepts and never
    answers, or an ssh that hangs, would hold reconcile (and with it `tvorch
    list` and the daemon) for good. So the probe runs in a daemon thread that
    is left behind when it does not finish in time.
    """
    libvirt.registerErrorHandler(_silence_default_handler, None)
    answer: list[bool | None] = []
    probe = threading.Thread(target=lambda: answer.append(_remote_domain_running(uri, uuid)),
                             name="remote-libvirt-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    return answer[0] if answer else None


def _remote_domain_running(uri: str, uuid: str) -> bool | None:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return None
    try:
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as err:
            return False if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN else None
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


class Hypervisor:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        libvirt.registerErrorHandler(_silence_default_handler, None)
        try:
            self._conn = libvirt_retry(libvirt.open)(uri)
        except libvirt.libvirtError as err:
            raise LibvirtError(f"cannot connect to libvirt at {uri}: {_message(err)}") from None

    def close(self) -> None:
        try:
            self._conn.close()
        except libvirt.libvirtError:
            pass

    def _call(self, what: str, func: Callable[[], T]) -> T:
        try:
            return libvirt_retry(func)()
        except libvirt.libvirtError as err:
            raise LibvirtError(f"libvirt refused to {what}: {_message(err)}") from None

    def _lookup(self, name: str) -> libvirt.virDomain:
        try:
            return libvirt_retry(self._conn.lookupByName)(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFoundError(f"libvirt has no domain named '{name}'") from None
            raise LibvirtError(f"libvirt lookup of '{name}' failed: {_message(err)}") from None

    # -- queries -----------------------------------------------------------

    def domain_exists(self, name: str) -> bool:
        try:
            self._lookup(name)
        except NotFoundError:
            return False
        return True

    def domain_uuid(self, name: str) -> str | None:
        """The UUID of the domain of that name, None if there is none."""
        try:
            dom = self._lookup(name)
        except NotFoundError:
            return None
        return self._call(f"read the UUID of '{name}'", dom.UUIDString)

    def domains(self) -> list[DomainInfo]:
        """Every domain, running or not: one call for all states, one per domain for tvorch's metadata."""
        stats = self._call("list domains", lambda: self._conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE))
        found = []
        for dom, values in stats:
            try:
                element = libvirt_retry(dom.metadata)(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NAMESPACE, 0)
            except libvirt.libvirtError as err:
                code = err.get_error_code()
                if code == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined since the listing
                if code != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    what = f"read the metadata of '{dom.name()}'"
                    raise LibvirtError(f"libvirt refused to {what}: {_message(err)}") from None
                element = None
            state = _STATES.get(values.get("state.state", libvirt.VIR_DOMAIN_NOSTATE), InstanceState.RUNNING)
            found.append(DomainInfo(dom.name(), dom.UUIDString(), state, _instance_id(element)))
        return found

    def network_exists(self, name: str) -> bool:
        try:
            libvirt_retry(self._conn.networkLookupByName)(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                return False
            raise LibvirtError(f"libvirt lookup of network '{name}' failed: {_message(err)}") from None
        return True

    def state(self, name: str) -> InstanceState:
        dom = self._lookup(name)
        code, _reason = self._call(f"read the state of '{name}'", dom.state)
        return _STATES.get(code, InstanceState.RUNNING)

    def migrating(self, name: str) -> bool:
        """Whether the domain is paused by a migration under way (either end): not yet settled either way."""
        try:
            dom = self._lookup(name)
        except NotFoundError:
            return False
        code, reason = self._call(f"read the state of '{name}'", dom.state)
        return code == libvirt.VIR_DOMAIN_PAUSED and reason in (
            libvirt.VIR_DOMAIN_PAUSED_MIGRATION, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY)

    def domain_xml(self, name: str, inactive: bool = False) -> str:
        dom = self._lookup(name)
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return self._call(f"read the XML of '{name}'", lambda: dom.XMLDesc(flags))

    # -- changes -----------------------------------------------------------

    def define(self, xml: str) -> None:
        self._call("define the domain", lambda: self._conn.defineXML(xml))

    def start(self, name: str) -> None:
        dom = self._lookup(name)
        self._call(f"start '{name}'", dom.create)

    def power_off(self, name: str) -> None:
        """Pull the plug (virsh destroy); a no-op when already off."""
        dom = self._lookup(name)
        if self._call(f"read the state of '{name}'", dom.isActive):
            self._call(f"power off '{name}'", dom.destroy)

    def shutdown(self, name: str, timeout: float) -> None:
        """Ask the guest to shut down (ACPI) and wait until it is off."""
        dom = self._lookup(name)
        if not self._call(f"read the state of '{name}'", dom.isActive):
            return
        self._call(f"shut down '{name}'", dom.shutdown)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._call(f"read the state of '{name}'", dom.isActive):
                return
            time.sleep(0.5)
        raise OperationTimeout(f"'{name}' did not shut down within {timeout:g} s; use --force to power it off")

    def managed_save(self, name: str) -> None:
        """Save the running guest to libvirt's managed save image and stop it (`virsh managedsave`)."""
        dom = self._lookup(name)
        self._call(f"save '{name}'", lambda: dom.managedSave(0))

    def has_managed_save(self, name: str) -> bool:
        dom = self._lookup(name)
        return bool(self._call(f"read the managed save state of '{name}'", lambda: dom.hasManagedSaveImage(0)))

    def undefine(self, name: str, purge_tpm: bool) -> None:
        """Remove the definition and its NVRAM; keep the vTPM state unless PURGE_TPM."""
        dom = self._lookup(name)
        flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        flags |= libvirt.VIR_DOMAIN_UNDEFINE_TPM if purge_tpm else libvirt.VIR_DOMAIN_UNDEFINE_KEEP_TPM
        self._call(f"undefine '{name}'", lambda: dom.undefineFlags(flags))

    def dump_memory(self, name: str, path: str) -> None:
        """Write the guest's memory (ELF, no device state) to PATH; the guest is paused meanwhile.

        For firmware reference VMs, whose event log lives in guest memory.
        """
        dom = self._lookup(name)
        self._call(f"dump the memory of '{name}'", lambda: dom.coreDumpWithFormat(
            path, libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW, libvirt.VIR_DUMP_MEMORY_ONLY))

    def migrate(self, name: str, dest_uri: str, persist_xml: str, migrate_uri: str | None, disks_uri: str | None,
                copy_storage: bool, bandwidth_mib: int | None = None) -> None:
        """Live, peer to peer: this libvirtd moves the running guest to DEST_URI's, defines it there
        (PERSIST_XML) and undefines it here. With COPY_STORAGE the top image layer (the overlay) is mirrored
        to a file of the same path the destination made; lower layers must be there already. Never
        retried: a migration is not idempotent."""
        dom = self._lookup(name)
        params: dict[str, object] = {libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: persist_xml}
        if migrate_uri:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = migrate_uri
        if disks_uri and copy_storage:
            params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] = disks_uri
        if bandwidth_mib:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                 | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
        if copy_storage:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
        try:
            dom.migrateToURI3(dest_uri, params, flags)
        except libvirt.libvirtError as err:
            raise LibvirtError(f"libvirt did not migrate '{name}': {_message(err)}") from None

    def remote_domain_running(self, uri: str, uuid: str) -> bool | None:
        """Whether libvirt at URI runs a domain with UUID; None when it cannot be reached (in time)."""
        return remote_domain_running(uri, uuid)

    # -- vTPM secrets ------------------------------------------------------

    @contextmanager
    def vtpm_secret(self, secret_uuid: str, usage: str, value: bytes) -> Iterator[None]:
        """libvirt holds VALUE as an ephemeral, private `vtpm` secret only while the body runs.

        libvirt hands the secret to swtpm when it starts it (``--key pwdfd=``);
        undefined right after, it is in no file and in libvirtd's memory for
        the seconds of a start only, and a start not made through tvorch finds
        no secret and fails.
        """
        self.drop_vtpm_secret(secret_uuid)  # a crash may have left one behind
        doc = ET.Element("secret", ephemeral="yes", private="yes")
        ET.SubElement(doc, "uuid").text = secret_uuid
        ET.SubElement(ET.SubElement(doc, "usage", type="vtpm"), "name").text = usage
        secret = self._call("define the vTPM secret", lambda: self._conn.secretDefineXML(ET.tostring(doc, "unicode")))
        try:
            self._call("set the vTPM secret", lambda: secret.setValue(value))
            yield
        finally:
            self.drop_vtpm_secret(secret_uuid)

    def secret_uuids(self) -> set[str]:
        """The UUIDs of every secret libvirtd holds (one call)."""
        return set(self._call("list secrets", self._conn.listSecrets))

    def drop_vtpm_secret(self, secret_uuid: str) -> None:
        try:
            secret = self._conn.secretLookupByUUIDString(secret_uuid)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
                return
            raise LibvirtError(f"libvirt lookup of secret {secret_uuid} failed: {_message(err)}") from None
        self._call("remove the vTPM secret", secret.undefine)
