"""Live migration with tvorch against plain libvirt's, of the same VM (issue #18's measured criterion).

    .venv/bin/python benchmarks/migrate.py [--rounds 5] [--explain] [--smoke]

An operator moving a VM off a node waits for `tvorch migrate` to return, so
its wall time against libvirt's own live migration of the same VM is what
matters. The benchmark builds two tvorch nodes of one fleet on this host
(tests/integration/nodes.py's pieces: a fleet root and intermediate, node A
on this host's libvirtd with its own config and state under /var/tmp, node B
the second libvirtd of scripts/two-nodes.sh with tvorch's hook, each with a
simulated host TPM (tests/host_fixtures.py), baselined, attested, the test
images trusted, its node CA under the fleet), points A's libvirt hook at
node A's config for the run, and boots two VMs on A:

  (a) the test guest launched with tvorch (--memory 512, its vTPM state
      encrypted with a key sealed to A's host TPM), and
  (b) the same domain as plain libvirt runs it: tvorch's domain XML without
      tvorch's <metadata> and without the vTPM's <encryption> (so libvirt
      manufactures an unencrypted vTPM at the first start), a new name and
      UUID, its own qcow2 overlay over the same base image (defined, then
      started; both hooks let a plain domain through).

Once both guests report ready, it times, round by round and alternating
which side goes first (this machine is shared and noisy), ROUNDS round trips
A -> B -> A of each, each leg wall-clock:

  (a) `tvorch migrate NAME B --via ... --migrate-uri ... --disks-uri ...`,
      the whole command (start-up, the destination's proof, the vTPM key
      unsealed and wrapped to B's TPM transport key, records, libvirt's live
      migration with the overlay copied, the ledger handoffs); back from B
      with B's tvorch, A's migrate-in run through `nsenter` into this
      process's namespaces (as tests/integration/test_migration.py does);
  (b) `virsh -c SRC migrate --live --p2p --copy-storage-inc --persistent
      --undefinesource NAME DEST --migrateuri ... --disks-uri ...`. The empty
      overlay it needs on the destination (tvorch's migrate-in makes its own)
      is made before the timer starts, and the source's is removed after.

It prints each side's median and best round trip, their ratio (a)/(b)
(goal < 1.3) and PASS/FAIL (exit 1 on FAIL), and where (a)'s extra time
goes, per leg: the command's start-up and exit (its wall time less the
seconds `tvorch migrate --json` reports), tvorch's own work (those seconds
less (b)'s wall time, which is libvirt's migration as an operator waits for
it), and for both sides libvirt's completed migration job as the
destination reports it (`virsh domjobinfo --completed`: the part of the
migration libvirt times itself, not its set-up and hand-over). --explain
then runs one more leg each way with both tvorch processes under cProfile
and prints what `tvorch migrate`'s service and the destination's
`migrate-in` spent their time in.

The full run holds the integration-test lock (/tmp/tvorch-integration.lock,
flock) from start to end, since it takes over A's one hook file, which the
integration tests point at their own config; it waits for a running test
session to finish. --smoke (what `make test` runs, about 15 s) boots nothing
and leaves A's hook alone, so it takes no lock (the test session running it
holds it): it sets up both nodes (node B up, configs, host baselines and
verdicts, images trusted, the fleet installed), checks that `tvorch migrate
--help` answers on A and that B answers `tvorch ca show` inside its
namespaces under the fleet's intermediate, and tears everything down.

Everything is named `tvbench-*` and removed at the end, also on Ctrl-C or
SIGTERM: both domains on whichever node holds them, node B (two-nodes.sh
down), the overlays, A's boot-file view, the swtpms, the work directory,
and A's hook is put back as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pstats
import re
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the test harness's node set-up (tests/) is shared, not copied

from launch_overhead import NVRAM_DIR, SWTPM_STATE, plain_xml  # noqa: E402  (this directory: the same plain-libvirt domain)

from tests.host_fixtures import simulated_host  # noqa: E402
from tests.integration.guest import wait_for_ready  # noqa: E402
from tests.integration.nodes import SCRIPT, Fleet, Node, _make_tvorch_node, _uris  # noqa: E402
from tvorch.adapters.files import atomic_write  # noqa: E402
from tvorch.service import hook_install  # noqa: E402

GUEST_DIR = Path(os.environ.get("TVORCH_TEST_GUEST_DIR", "/var/cache/tvorch/test-guest"))
IMAGE = GUEST_DIR / "guest.qcow2"
URI = "qemu:///system"
HOOK = Path("/etc/libvirt/hooks/qemu")
LOCK = Path("/tmp/tvorch-integration.lock")
GOAL_RATIO = 1.3
TAG = secrets.token_hex(3)
PREFIX = f"tvbench-mig-{TAG}"


def fail(message: str) -> SystemExit:
    return SystemExit(f"migrate: {message}")


def run(*args: str, check: bool = True, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise fail(f"{shlex.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def virsh(uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("virsh", "-q", "-c", uri, *args, check=check)


# -- the two nodes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shared:
    """The paths a domain's XML names, the same on both nodes (as tests/integration/nodes.py has them):
    /var/lib/libvirt and /run/tvorch are each node's own, /var/tmp is shared."""

    overlay_dir: Path  # tvorch's overlays
    plain_dir: Path  # (b)'s overlays
    boot_view: Path
    console: Path


def node_config(state_dir: Path, shared: Shared) -> str:
    """A node's tvorch.toml; simulated_host replaces the tcti line with its host's [host] settings."""
    return (f'state_dir = "{state_dir}"\noverlay_dir = "{shared.overlay_dir}"\n'
            f'console_log_dir = "{shared.console}"\nboot_files_dir = "{shared.boot_view}"\n'
            f'libvirt_uri = "{URI}"\nstop_timeout = 60\n[host]\ntcti = "simulated"\n')


def node_a(stack: contextlib.ExitStack, root: Path, shared: Shared, b_dir: Path, fleet: Fleet) -> Node:
    host = stack.enter_context(simulated_host(root, node_config(root / "state", shared)))
    node = Node("a", host.config, root / "state", URI, _uris(b_dir)[1], host)
    stack.callback(unmount_all, shared.boot_view)
    stack.callback(shutil.rmtree, shared.overlay_dir, True)
    _make_tvorch_node(node, GUEST_DIR, fleet)
    return node


def node_b(stack: contextlib.ExitStack, root: Path, shared: Shared, b_dir: Path, fleet: Fleet) -> Node:
    """two-nodes.sh up with tvorch's hook on B's config (TVORCH_B_CONFIG); `host init` inside B, whose
    hostname the AK certification and the node CA name."""
    prefix = (str(SCRIPT), "exec", str(b_dir), "--")
    host = stack.enter_context(simulated_host(root, node_config(b_dir / "state", shared),
                                              command=(*prefix, sys.executable, "-m", "tvorch.cli"), init=False))
    stack.callback(run, str(SCRIPT), "down", str(b_dir), check=False)
    run(str(SCRIPT), "up", str(b_dir), env={**os.environ, "TVORCH_B_CONFIG": str(host.config)}, timeout=120)
    b_uri = _uris(b_dir)[0]
    node = Node("b", host.config, b_dir / "state", b_uri, b_uri, host, prefix)
    node.run("host", "init")
    _make_tvorch_node(node, GUEST_DIR, fleet)
    return node


def unmount_all(path: Path) -> None:
    while run("umount", "-l", str(path), check=False).returncode == 0:
        pass
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def integration_lock() -> Iterator[None]:
    """The lock integration test sessions run under (`flock /tmp/tvorch-integration.lock`), held throughout."""
    with LOCK.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {LOCK} (an integration test session holds it)", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def hook_pointed_at(config: Path) -> Iterator[None]:
    """A's one hook file runs tvorch with node A's config for the run, then holds what it held before."""
    if not (HOOK.is_file() and hook_install.MARKER in HOOK.read_text()):
        raise fail(f"tvorch's hook is not installed at {HOOK} (make libvirt)")
    original = HOOK.read_bytes()
    atomic_write(HOOK, hook_install.render_shim(sys.executable, str(config)), mode=0o755)
    try:
        yield
    finally:
        atomic_write(HOOK, original, mode=0o755)


# -- one leg of a migration, each side ---------------------------------------------------------------


# Below the kernel's ephemeral range (32768-60999 here), which the many local TCP clients (swtpm) draw from.
_port = 20000 + 2 * secrets.randbelow(5000)


def ports() -> tuple[str, str]:
    """A fresh pair of loopback ports a leg (QEMU's stream, the disk copy): none is reused in a run."""
    global _port
    _port += 2
    return f"tcp://127.0.0.1:{_port}", f"tcp://127.0.0.1:{_port + 1}"


def via(node: Node, command: list[str] | None = None) -> str:
    """How the source runs the destination's tvorch (COMMAND, default node.command()): B's through
    two-nodes.sh exec; from inside B, A's namespaces are this process's."""
    command = command or node.command()
    if node.name == "a":
        return shlex.join(["nsenter", "-t", str(os.getpid()), "-m", "-u", "--", *command])
    return shlex.join(command)


def job_seconds(dest: Node, name: str) -> float:
    """libvirt's own time for the migration job just completed (the destination keeps its statistics)."""
    out = virsh(dest.uri, "domjobinfo", "--completed", name).stdout
    found = re.search(r"^Time elapsed:\s+(\d+)\s+ms", out, re.MULTILINE)
    if found is None:
        raise fail(f"no completed migration job for {name} on node {dest.name}:\n{out}")
    return int(found[1]) / 1000


@dataclass
class Leg:
    wall: float
    job: float  # libvirt's migration job
    service: float | None = None  # what `tvorch migrate --json` reports (tvorch only)
    phases: dict[str, float] = field(default_factory=dict)  # its phases: where its seconds went


@dataclass
class Side:
    label: str
    name: str
    migrate: Callable[[Node, Node], Leg]
    legs: list[Leg] = field(default_factory=list)
    trips: list[float] = field(default_factory=list)

    def round_trip(self, a: Node, b: Node) -> None:
        there = self.migrate(a, b)
        back = self.migrate(b, a)
        self.legs += [there, back]
        self.trips.append(there.wall + back.wall)


def tvorch_leg(name: str) -> Callable[[Node, Node], Leg]:
    def leg(src: Node, dest: Node) -> Leg:
        migrate_uri, disks_uri = ports()
        t0 = time.perf_counter()
        proc = subprocess.run([*src.command(), "migrate", name, dest.peer_uri, "--via", via(dest),
                               "--migrate-uri", migrate_uri, "--disks-uri", disks_uri, "--json"],
                              capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise fail(f"tvorch migrate {name} {src.name} -> {dest.name} exited {proc.returncode}: "
                       f"{proc.stderr.strip()}")
        done = json.loads(proc.stdout)
        return Leg(wall, job_seconds(dest, name), done["seconds"], done["phases"])
    return leg


def virsh_leg(name: str, overlay: Path) -> Callable[[Node, Node], Leg]:
    def leg(src: Node, dest: Node) -> Leg:
        dest.sh(f"qemu-img create -q -f qcow2 -F qcow2 -b {shlex.quote(str(IMAGE))} {shlex.quote(str(overlay))}")
        migrate_uri, disks_uri = ports()
        t0 = time.perf_counter()
        virsh(src.uri, "migrate", "--live", "--p2p", "--copy-storage-inc", "--persistent", "--undefinesource",
              name, dest.peer_uri, "--migrateuri", migrate_uri, "--disks-uri", disks_uri)
        wall = time.perf_counter() - t0
        src.sh(f"rm -f {shlex.quote(str(overlay))}")  # as tvorch's source drops its overlay
        return Leg(wall, job_seconds(dest, name))
    return leg


# -- the run -----------------------------------------------------------------------------------------


def terminate_as_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def remove_domain(nodes: tuple[Node, ...], name: str, tvorch: bool) -> None:
    """NAME gone from both nodes, and what libvirt leaves on A of a domain that left it (vTPM state, NVRAM);
    B's go with node B."""
    uuids = {virsh(node.uri, "domuuid", name, check=False).stdout.strip() for node in nodes} - {""}
    for node in nodes:
        if tvorch:
            node.run("destroy", "--purge-vtpm", name, check=False)
        virsh(node.uri, "destroy", name, check=False)
        virsh(node.uri, "undefine", "--nvram", "--tpm", name, check=False)
    for dom_uuid in uuids:
        shutil.rmtree(SWTPM_STATE / dom_uuid, ignore_errors=True)
    (NVRAM_DIR / f"{name}_VARS.fd").unlink(missing_ok=True)


def boot_guests(stack: contextlib.ExitStack, a: Node, b: Node, shared: Shared, work: Path) -> tuple[Side, Side]:
    """(a) launched with tvorch, (b) the same domain defined and started with plain libvirt, both booted."""
    tv_name, plain_name = f"{PREFIX}-tvorch", f"{PREFIX}-virsh"
    stack.callback(remove_domain, (a, b), tv_name, True)
    record = a.json("launch", str(IMAGE), "--name", tv_name, "--memory", "512")
    template = virsh(a.uri, "dumpxml", "--inactive", tv_name).stdout
    overlay = shared.plain_dir / f"{plain_name}.qcow2"
    for node in (a, b):
        node.sh(f"mkdir -p -m 0711 {shlex.quote(str(shared.plain_dir))}")
    stack.callback(shutil.rmtree, shared.plain_dir, True)  # A's; B's goes with node B
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(IMAGE), str(overlay))
    # Its own directory: the hook refuses a plain domain that names files in tvorch's console_log_dir.
    console = work / "plain" / f"{plain_name}.log"
    console.parent.mkdir(mode=0o755)
    xml = work / f"{plain_name}.xml"
    xml.write_text(plain_xml(template, plain_name, str(uuid.uuid4()), overlay, console))
    stack.callback(remove_domain, (a, b), plain_name, False)
    virsh(a.uri, "define", str(xml))
    virsh(a.uri, "start", plain_name)
    for log in (Path(record["console_log"]), console):
        wait_for_ready(log)
    return (Side("(a) tvorch migrate", tv_name, tvorch_leg(tv_name)),
            Side("(b) virsh migrate --live", plain_name, virsh_leg(plain_name, overlay)))


def profiled(node: Node, out: Path) -> list[str]:
    """NODE's CLI run under cProfile (written to OUT, which both nodes see), argv for the command or --via."""
    command = node.command()
    at = command.index("-m")
    return [*command[:at], "-m", "cProfile", "-o", str(out), *command[at:]]


def callees(stats_path: Path, file: str, function: str) -> list[tuple[float, str]]:
    """(seconds, callee) of everything FUNCTION in tvorch/FILE called, its cumulative time from that call."""
    stats = pstats.Stats(str(stats_path)).stats  # type: ignore[attr-defined]
    parent = next((k for k in stats if k[0].endswith("tvorch/" + file) and k[2] == function), None)
    if parent is None:
        return []
    rows = []
    for (path, line, func), (_cc, _nc, _tt, _ct, callers) in stats.items():
        if parent in callers:
            where = path.split("/tvorch/", 1)[1] if "/tvorch/" in path else Path(path).name
            rows.append((callers[parent][3], f"{func} ({where}:{line})"))
    return sorted(rows, reverse=True)


def explain(name: str, a: Node, b: Node, work: Path) -> None:
    """Where tvorch's time goes: one more leg each way, both ends under cProfile."""
    print("\n--explain: one more leg each way, both tvorch processes under cProfile "
          "(cumulative seconds of what the service called; profiling slows Python down)")
    for src, dest in ((a, b), (b, a)):
        src_prof, dest_prof = work / f"src-{src.name}.prof", work / f"dest-{dest.name}.prof"
        migrate_uri, disks_uri = ports()
        t0 = time.perf_counter()
        run(*profiled(src, src_prof), "migrate", name, dest.peer_uri, "--via", via(dest, profiled(dest, dest_prof)),
            "--migrate-uri", migrate_uri, "--disks-uri", disks_uri)
        print(f"\n{src.name} -> {dest.name}: {time.perf_counter() - t0:.2f} s wall")
        for label, path, file, function in (("source, service.migrate.migrate", src_prof, "service/migrate.py",
                                             "migrate"),
                                            ("destination, service.migrate_in.serve", dest_prof,
                                             "service/migrate_in.py", "serve")):
            rows = callees(path, file, function)
            print(f"  {label}: {sum(t for t, _ in rows):.2f} s in its callees" if rows else
                  f"  {label}: not found in the profile")
            for seconds, callee in rows[:8]:
                if seconds >= 0.01:
                    print(f"    {seconds:6.2f} s  {callee}")


def report(tv: Side, plain: Side) -> bool:
    med_a, med_b = statistics.median(tv.trips), statistics.median(plain.trips)
    print(f"\nround trip A -> B -> A{'':<12}{'median':>9}{'best':>9}")
    for side in (tv, plain):
        print(f"{side.label:<34}{statistics.median(side.trips):>8.2f}s{min(side.trips):>8.2f}s")
    print(f"overhead (a)-(b): {med_a - med_b:.2f} s per round trip")

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):6.2f} s"

    walls_b = [leg.wall for leg in plain.legs]
    served = [leg for leg in tv.legs if leg.service is not None]
    print(f"\nper leg, medians of {len(tv.legs)} legs each:")
    print(f"  (b) virsh migrate, wall                                {med(walls_b)}")
    print(f"      of which libvirt's completed job (domjobinfo)      {med([leg.job for leg in plain.legs])}")
    print(f"  (a) tvorch migrate, wall                               {med([leg.wall for leg in tv.legs])}")
    print(f"      command start-up and exit (wall - its seconds)     {med([leg.wall - leg.service for leg in served])}")
    print(f"      libvirt's completed job (domjobinfo)               {med([leg.job for leg in tv.legs])}")
    print(f"      tvorch's own work (its seconds - (b)'s wall)       "
          f"{statistics.median([leg.service for leg in served]) - statistics.median(walls_b):6.2f} s"
          "  (the destination's proof, key transport, records, ledger)")
    for step in served[0].phases if served else ():
        print(f"        {step:<48} {med([leg.phases[step] for leg in served])}")
    ratio = med_a / med_b
    verdict = ratio < GOAL_RATIO
    print(f"\nratio (a)/(b): {ratio:.2f}  goal < {GOAL_RATIO}: {'PASS' if verdict else 'FAIL'}")
    return verdict


def smoke_checks(a: Node, b: Node) -> None:
    if "DEST_URI" not in a.run("migrate", "--help").stdout:
        raise fail("`tvorch migrate --help` does not show DEST_URI")
    info = b.json("ca", "show")
    if info.get("issuer") != "CN=tvbench Fleet Intermediate":
        raise fail(f"node B's CA is not under the benchmark's fleet: issuer {info.get('issuer')}")
    print(f"smoke: node A and node B ({b.uri}) set up; `tvorch migrate --help` answers on A, "
          f"B's node CA is {info['subject']} under {info['issuer']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed round trips A -> B -> A of each side "
                                                              "(default 5)")
    parser.add_argument("--smoke", action="store_true",
                        help="set up and tear down both nodes, no guest, no timing (make test)")
    parser.add_argument("--explain", action="store_true",
                        help="then one more leg each way under cProfile: where tvorch's time goes")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not IMAGE.is_file():
        raise fail(f"no test guest at {IMAGE} (make guest)")
    if virsh(URI, "version", check=False).returncode != 0:
        raise fail(f"libvirtd is not answering at {URI}")
    signal.signal(signal.SIGTERM, terminate_as_interrupt)
    signal.signal(signal.SIGHUP, terminate_as_interrupt)

    with contextlib.ExitStack() as stack:
        if not args.smoke:
            stack.enter_context(integration_lock())
        work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-", dir="/var/tmp"))
        work.chmod(0o755)  # the console logs are under it: virtlogd of either node writes them
        stack.callback(shutil.rmtree, work, True)
        shared = Shared(Path(f"/var/lib/libvirt/images/{PREFIX}"), Path(f"/var/lib/libvirt/images/{PREFIX}-plain"),
                        Path(f"/run/tvorch/{PREFIX}-boot"), work / "console")
        b_dir = Path(f"/var/tmp/{PREFIX}-node-b")
        t0 = time.perf_counter()
        try:
            fleet = Fleet.make(work / "fleet", "tvbench Fleet")
            (work / "a").mkdir()
            (work / "b").mkdir()
            a = node_a(stack, work / "a", shared, b_dir, fleet)
            b = node_b(stack, work / "b", shared, b_dir, fleet)
        except AssertionError as err:  # the harness's helpers assert what they need
            raise fail(f"setting up the two nodes failed: {str(err).strip()}") from None
        print(f"two tvorch nodes of one fleet set up in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.smoke:
            smoke_checks(a, b)
            return 0

        stack.enter_context(hook_pointed_at(a.config))
        try:
            tv, plain = boot_guests(stack, a, b, shared, work)
        except AssertionError as err:
            raise fail(f"booting the guests failed: {str(err).strip()}") from None
        print("both guests booted on node A; timing", args.rounds, "round trips of each", flush=True)
        for i in range(args.rounds):
            for side in ((tv, plain) if i % 2 == 0 else (plain, tv)):
                side.round_trip(a, b)
            print(f"round {i + 1}/{args.rounds}: tvorch {tv.trips[-1]:6.2f} s "
                  f"({tv.legs[-2].wall:.2f} + {tv.legs[-1].wall:.2f})   "
                  f"virsh {plain.trips[-1]:6.2f} s ({plain.legs[-2].wall:.2f} + {plain.legs[-1].wall:.2f})",
                  flush=True)
        for side in (tv, plain):
            if side.name not in virsh(a.uri, "list", "--name").stdout.split():
                raise fail(f"{side.name} is not running on node A after its round trips")
        passed = report(tv, plain)
        if args.explain:
            explain(tv.name, a, b, work)
    return 0 if passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupted:  # Ctrl-C, SIGTERM or SIGHUP: main's ExitStack has cleaned up
        sys.exit(f"migrate: interrupted ({interrupted or 'Ctrl-C'}); what it made is removed")
