"""A simulated host for tests: a real swtpm as the host TPM, its PCRs extended from real logs.

The PCRs are extended with the events of a UEFI event log captured from the
test guest under OVMF (tests/data/eventlogs) and with an IMA measurement list,
in the kernel's binary format, that measures the binaries trusted launch relies
on with their real digests. No mock: tvorch quotes a real TPM and replays real
logs against it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.tpm_fixtures import running_swtpm
from tvorch.adapters.tpm import open_tpm
from tvorch.config import parse_config
from tvorch.core.attestation.eventlog import EV_NO_ACTION, parse_event_log
from tvorch.core.attestation.ima import boot_aggregate_digest, boot_aggregate_entry, boot_aggregate_pcrs, ima_ng_entry, to_binary
from tvorch.service.host import must_measure

EVENTLOG = Path(__file__).resolve().parent / "data" / "eventlogs" / "uefi-crb.bin"


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass
class Host:
    root: Path
    config: Path
    tcti: str
    ima_log: Path
    entries: list
    # The argv that runs the tvorch CLI on this host (another node's: inside its namespaces).
    command: tuple[str, ...] = (sys.executable, "-m", "tvorch.cli")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.command, "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=120)

    def json(self, *args: str) -> dict:
        proc = self.run(*args, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def measure(self, entry) -> None:
        """What the kernel does: append to the list, extend PCR 10."""
        self.entries.append(entry)
        self.ima_log.write_bytes(to_binary(self.entries))
        with open_tpm(self.tcti) as tpm:
            tpm.extend(10, {"sha256": sha256(entry.template_data)})


def host_settings(root: Path, tcti: str) -> str:
    """The [host] table's keys for a simulated host under ROOT."""
    return (f'tcti = "{tcti}"\neventlog = "{EVENTLOG}"\nima_log = "{root / "ima.bin"}"\n'
            f'policy = "{root / "host-policy.json"}"\n')


@contextmanager
def simulated_host(root: Path, config_text: str | None = None, boot_aggregate: bytes | None = None,
                   command: tuple[str, ...] | None = None, init: bool = True) -> Iterator[Host]:
    """A host whose TPM measured EVENTLOG and an IMA list, with its AK made (`tvorch host init`).

    CONFIG_TEXT: a config holding the line `tcti = "<anything>"` in its [host]
    table, which is replaced by this host's settings; default, a config of its own.
    BOOT_AGGREGATE: the IMA list's first digest; default, the kernel's (of PCRs 0-9).
    COMMAND: Host.command (default this interpreter's CLI). INIT=False leaves `host init` to the
    caller (a node whose namespaces are not up yet: the AK certification names the node's hostname).
    """
    with running_swtpm(root / "tpm") as tcti:
        config = root / "tvorch.toml"
        if config_text is None:
            config.write_text(f'state_dir = "{root / "state"}"\n[host]\n' + host_settings(root, tcti))
        else:
            start = config_text.index('tcti = "')
            end = config_text.index("\n", start) + 1
            config.write_text(config_text[:start] + host_settings(root, tcti) + config_text[end:])
        with open_tpm(tcti) as tpm:
            for event in parse_event_log(EVENTLOG.read_bytes()).events:
                if event.event_type != EV_NO_ACTION:
                    tpm.extend(event.pcr, {"sha256": bytes.fromhex(event.digests["sha256"])})
            boot_pcrs = tpm.read_pcrs(boot_aggregate_pcrs("sha256"))
        node = Host(root, config, tcti, root / "ima.bin", [], command or Host.command)
        # What the kernel measures first: the digest of the boot PCRs as IMA starts.
        node.measure(boot_aggregate_entry(boot_aggregate or boot_aggregate_digest(boot_pcrs, "sha256")))
        for path in must_measure(parse_config(config.read_bytes())):
            node.measure(ima_ng_entry(path, sha256(Path(path).read_bytes())))
        if init:
            proc = node.run("host", "init")
            assert proc.returncode == 0, proc.stderr
        yield node
