"""What `tvorch launch` costs over starting the same domain with plain libvirt.

    .venv/bin/python benchmarks/launch_overhead.py [--runs 5] [--explain] [--smoke]

`tvorch launch` is on a cloud controller's critical path, so its overhead
over libvirt's own start is what matters. This runs, interleaved run by run
(the order alternates, so neither side always goes first):

  (a) `tvorch launch` of the test guest image (already trusted, its digest
      already cached) with the node's DEFAULT config: the installed hook
      reads that config, so an instance of any other config would be refused
      at start. Wall time until the command returns (the domain is started):
      start-up and imports, checks, measuring (cached), sealing the vTPM
      key to the host TPM, manufacturing the vTPM (swtpm_setup, EK
      certificates from the node CA), signing the manifest, the store, the
      overlay, defining, unsealing the key for the start, the hook's checks
      on start. Then (untimed) `tvorch destroy --purge-vtpm`.
  (b) `virsh create FILE` of the same domain: the XML of a tvorch-launched
      domain (`virsh dumpxml --inactive`), renamed, with a new UUID, without
      tvorch's <metadata> (so the hook lets it pass) and without the vTPM's
      <encryption> (libvirt then manufactures the vTPM itself at first start,
      with its own local CA), its guest channel socket renamed, its disk a
      fresh qcow2 overlay made outside the timing. Wall time until it returns; then
      `virsh destroy` (transient: gone) and its swtpm state, nvram and
      overlay are removed.

The `<backingStore>` pin is kept on (b): it does not get in the way, and
without it libvirt would chown the base image on start, changing its ctime
and so evicting its digest from tvorch's cache (every (a) would rehash).

Both sides pay libvirtd's own work, one swtpm_setup manufacture of a new
vTPM and the hook (which lets an untagged domain through at once). The node's
default config must reach a host TPM (`make demo` sets up a stand-in on a
machine without one). It prints the
median and p90 of each, the ratio (a)/(b) of the medians and PASS/FAIL
against the goal (< 1.5). --explain adds where (a)'s time goes: import time
(`-X importtime`) of a real launch, and a cProfile of the launch in process.

Everything is named `tvbench-*` and removed at the end (console logs too,
which `tvorch destroy` keeps). The node's store keeps the `destroyed` records
of the (a) runs, as after any destroy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pstats
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
TVORCH = str(VENV_BIN / "tvorch")
IMAGE = Path(os.environ.get("TVORCH_TEST_GUEST_DIR", "/var/cache/tvorch/test-guest")) / "guest.qcow2"
URI = "qemu:///system"
HOOK = Path("/etc/libvirt/hooks/qemu")
SWTPM_STATE = Path("/var/lib/libvirt/swtpm")
NVRAM_DIR = Path("/var/lib/libvirt/qemu/nvram")
# The default config's console_log_dir: `tvorch destroy` keeps console logs; the benchmark removes its own.
CONSOLE_LOG_DIR = Path("/var/log/tvorch")
# qemu (libvirt-qemu) must reach (b)'s overlays, as it reaches tvorch's: under libvirt's images.
IMAGES_DIR = Path("/var/lib/libvirt/images")
GOAL_RATIO = 1.5
TAG = secrets.token_hex(2)
SMOKE_NEEDS = "node"  # tests/integration/test_benchmarks.py: a config the installed hook reads
# --smoke (make test): 1 run, the goal not judged, and the config of $TVORCH_CONFIG, whose hook it is.
SMOKE = "--smoke" in sys.argv[1:]


def run(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise SystemExit(f"launch_overhead: {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("virsh", "-q", "-c", URI, *args, check=check)


def tvorch(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # The default config on purpose: the installed hook reads it (see the module docstring).
    env = {k: v for k, v in os.environ.items() if SMOKE or k != "TVORCH_CONFIG"}
    return run(TVORCH, *args, check=check, env=env)


def preflight() -> None:
    """Refuse to measure a set-up that would fail or measure the wrong thing."""
    if not IMAGE.is_file():
        raise SystemExit(f"launch_overhead: no test guest at {IMAGE} (make guest)")
    if virsh("version", check=False).returncode != 0:
        raise SystemExit(f"launch_overhead: libvirtd is not answering at {URI}")
    if SMOKE:
        return
    if "TVORCH_CONFIG" in os.environ:
        print("warning: TVORCH_CONFIG is set; ignored (the hook reads the default config)", file=sys.stderr)
    if HOOK.is_file() and "TVORCH_CONFIG" in HOOK.read_text():
        # The integration tests point the hook at their own config while they run.
        raise SystemExit(f"launch_overhead: {HOOK} reads another config (integration tests running?); "
                         "a launch with the default config would be refused")


def trust_image() -> None:
    tvorch("image", "trust", str(IMAGE), "--label", "test guest (launch_overhead)")


def launch_tvorch(name: str) -> tuple[float, dict]:
    """(seconds until `tvorch launch` returned, its JSON record)."""
    t0 = time.perf_counter()
    proc = tvorch("launch", str(IMAGE), "--name", name, "--json", check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"launch_overhead: tvorch launch {name} exited {proc.returncode}: {proc.stderr.strip()}")
    record = json.loads(proc.stdout)
    if record["state"] != "running":
        raise SystemExit(f"launch_overhead: {name} is {record['state']} after launch")
    return elapsed, record


def image_digest_was_cached(name: str) -> bool:
    doc = json.loads(tvorch("manifest", "show", name, "--json").stdout)
    layers = [m for m in doc["manifest"]["measurements"] if m["kind"] == "image-layer"]
    return bool(layers) and all(m["details"].get("cached") is True for m in layers)


def destroy_tvorch(name: str) -> None:
    tvorch("destroy", "--purge-vtpm", name, check=False)


def plain_xml(template: str, name: str, dom_uuid: str, overlay: Path, console: Path) -> str:
    """The tvorch domain as plain libvirt would be given it: new name and UUID, no
    tvorch metadata, its own overlay and console log; firmware, TPM and pin kept."""
    root = ET.fromstring(template)
    root.find("name").text = name  # type: ignore[union-attr]
    root.find("uuid").text = dom_uuid  # type: ignore[union-attr]
    metadata = root.find("metadata")
    if metadata is not None:
        root.remove(metadata)
    source = root.find("./devices/disk/source")
    assert source is not None, "the template has no disk"
    source.set("file", str(overlay))
    for log in root.iterfind("./devices/*/log"):
        log.set("file", str(console))
    for backend in root.iterfind("./devices/tpm/backend"):
        for encryption in backend.findall("encryption"):
            backend.remove(encryption)  # plain libvirt keeps vTPM state in clear
    for channel in root.iterfind("./devices/channel/source"):  # tvorch's channel directory is not plain libvirt's
        channel.set("path", str(console.with_name(f"{name}.sock")))
    nvram = root.find("./os/nvram")
    if nvram is not None:  # libvirt's default path follows the new name
        root.find("os").remove(nvram)  # type: ignore[union-attr]
    return ET.tostring(root, encoding="unicode")


def create_plain(xml_path: Path) -> float:
    t0 = time.perf_counter()
    proc = virsh("create", str(xml_path), check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"launch_overhead: virsh create {xml_path} exited {proc.returncode}: {proc.stderr.strip()}")
    return elapsed


def destroy_plain(name: str, dom_uuid: str) -> None:
    virsh("destroy", name, check=False)
    shutil.rmtree(SWTPM_STATE / dom_uuid, ignore_errors=True)
    (NVRAM_DIR / f"{name}_VARS.fd").unlink(missing_ok=True)


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile (with 5 runs: the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def explain(workdir: Path) -> None:
    """Where (a)'s time goes: imports of a real launch, then a cProfile of one in process."""
    name = f"tvbench-explain-{TAG}"
    env = {k: v for k, v in os.environ.items() if SMOKE or k != "TVORCH_CONFIG"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "tvorch.cli", "launch", str(IMAGE),
                           "--name", name], capture_output=True, text=True, env=env)
    destroy_tvorch(name)
    rows = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            self_us, cum_us, module = line[len("import time:"):].split("|")
            rows.append((int(self_us), int(cum_us), module.rstrip()))
    top_level = [(c, m.strip()) for s, c, m in rows if not m.startswith("  ")]
    print(f"\n(a) imports, -X importtime of a real launch: {sum(s for s, _, _ in rows) / 1000:.1f} ms in all; "
          "top-level imports by cumulative time:")
    for cum, module in sorted(top_level, reverse=True)[:8]:
        print(f"  {cum / 1000:7.1f} ms  {module}")
    by_package: dict[str, int] = {}
    for self_us, _, module in rows:
        package = module.strip().split(".")[0]
        by_package[package] = by_package.get(package, 0) + self_us
    print("  by package (self time summed): " + ", ".join(
        f"{p} {us / 1000:.1f} ms" for p, us in sorted(by_package.items(), key=lambda kv: -kv[1])[:8]))

    # cProfile the whole command in a fresh interpreter, imports included.
    stats_path = workdir / "launch.prof"
    code = (
        "import cProfile, sys\n"
        "prof = cProfile.Profile()\n"
        "prof.enable()\n"
        "from tvorch.cli import main\n"
        f"status = main(['launch', {str(IMAGE)!r}, '--name', {name!r}])\n"
        "prof.disable()\n"
        f"prof.dump_stats({str(stats_path)!r})\n"
        "sys.exit(status)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    destroy_tvorch(name)
    if proc.returncode != 0:
        print(f"(profiled launch failed: {proc.stderr.strip()})")
        return

    stats = pstats.Stats(str(stats_path))
    # (file, function) -> what it is; cumulative times, so nested rows overlap.
    wanted = {
        ("cli/__init__.py", "main"): "whole command (tvorch.cli.main)",
        ("service/launch.py", "launch"): "launch service (tvorch.service.launch.launch)",
        ("adapters/hypervisor.py", "__init__"): "  libvirt connection",
        ("adapters/store.py", "__init__"): "  open the store",
        ("adapters/imagefiles.py", "inspect_image"): "  inspect the image chain",
        ("service/reconcile.py", "reconcile"): "  reconcile (settle interrupted launches)",
        ("adapters/hypervisor.py", "domain_exists"): "  name check in libvirt",
        ("adapters/hostcaps.py", "probe_kvm"): "  probe KVM",
        ("service/measure.py", "measure_launch"): "  measure (cached digests)",
        ("service/measure.py", "judge"): "  check against reference values",
        ("service/manifests.py", "issue_manifest"): "  sign the manifest",
        ("adapters/node_keys.py", "load_or_create"): "    of which: load the node keys",
        ("adapters/store.py", "create_instance"): "  store: create the record",
        ("adapters/store.py", "save_manifest"): "  store: save the manifest",
        ("adapters/imagefiles.py", "create_overlay"): "  qemu-img create (overlay)",
        ("adapters/hypervisor.py", "define"): "  libvirt define",
        ("adapters/hypervisor.py", "start"): "  libvirt start (hook, swtpm_setup, qemu)",
        ("adapters/store.py", "update_instance"): "  store: record updates",
    }
    found: dict[tuple[str, str], float] = {}
    for (filename, _line, func), (_cc, _nc, _tt, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        for key in wanted:
            if func == key[1] and filename.endswith("tvorch/" + key[0]):
                found[key] = found.get(key, 0.0) + cumtime
    print(f"\n(a) cProfile of one launch in process (wall {wall * 1000:.0f} ms including interpreter start-up):")
    for key, label in wanted.items():
        if key in found:
            print(f"  {found[key] * 1000:8.1f} ms  {label}")
    print("  (outside the service: interpreter start-up, imports, click, config and logging)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each side (default 5)")
    parser.add_argument("--explain", action="store_true", help="also show where tvorch's time goes")
    parser.add_argument("--smoke", action="store_true",
                        help="1 run, goal not judged, $TVORCH_CONFIG kept (make test)")
    args = parser.parse_args()
    if args.smoke:
        args.runs = 1
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    preflight()
    trust_image()
    workdir = Path(tempfile.mkdtemp(prefix=f"tvbench-{TAG}-", dir="/var/tmp"))
    overlay_dir = IMAGES_DIR / f"tvbench-{TAG}"
    overlay_dir.mkdir(mode=0o711)
    launched: list[str] = []
    created: list[tuple[str, str]] = []
    tv_times: list[float] = []
    plain_times: list[float] = []
    uncached = 0
    try:
        # Warm-up, untimed: fills the digest cache and the page cache, and gives (b) its XML.
        template_name = f"tvbench-template-{TAG}"
        launched.append(template_name)
        launch_tvorch(template_name)
        template = virsh("dumpxml", "--inactive", template_name).stdout
        destroy_tvorch(template_name)
        plain_overlay = overlay_dir / "warm.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(IMAGE), str(plain_overlay))
        warm_uuid, warm_name = str(uuid.uuid4()), f"tvbench-virsh-{TAG}-warm"
        xml_path = workdir / "warm.xml"
        xml_path.write_text(plain_xml(template, warm_name, warm_uuid, plain_overlay, workdir / "warm.log"))
        created.append((warm_name, warm_uuid))
        create_plain(xml_path)
        destroy_plain(warm_name, warm_uuid)
        plain_overlay.unlink()

        for i in range(args.runs):
            tv_name = f"tvbench-tv-{TAG}-{i}"
            plain_name, plain_uuid = f"tvbench-virsh-{TAG}-{i}", str(uuid.uuid4())
            overlay = overlay_dir / f"{plain_name}.qcow2"
            run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(IMAGE), str(overlay))
            xml_path = workdir / f"{plain_name}.xml"
            xml_path.write_text(plain_xml(template, plain_name, plain_uuid, overlay, workdir / f"{plain_name}.log"))

            def side_a() -> None:
                nonlocal uncached
                launched.append(tv_name)
                elapsed, _record = launch_tvorch(tv_name)
                tv_times.append(elapsed)
                if not image_digest_was_cached(tv_name):
                    uncached += 1
                    print(f"warning: {tv_name}: the image digest was not cached (details.cached false): "
                          "this run hashed the image", file=sys.stderr)
                destroy_tvorch(tv_name)

            def side_b() -> None:
                created.append((plain_name, plain_uuid))
                plain_times.append(create_plain(xml_path))
                destroy_plain(plain_name, plain_uuid)
                overlay.unlink(missing_ok=True)

            for side in ((side_a, side_b) if i % 2 == 0 else (side_b, side_a)):
                side()
            print(f"run {i + 1}/{args.runs}: tvorch launch {tv_times[-1] * 1000:7.1f} ms   "
                  f"virsh create {plain_times[-1] * 1000:7.1f} ms", flush=True)

        if args.explain:
            explain(workdir)
    finally:
        for name in launched:
            if virsh("domstate", name, check=False).returncode == 0:
                destroy_tvorch(name)
        for name, dom_uuid in created:
            destroy_plain(name, dom_uuid)
        shutil.rmtree(overlay_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        for log in CONSOLE_LOG_DIR.glob(f"tvbench-*{TAG}*.log"):
            log.unlink(missing_ok=True)

    med_a, med_b = statistics.median(tv_times), statistics.median(plain_times)
    ratio = med_a / med_b
    print(f"\n{'':<34}{'median':>10}{'p90':>10}")
    print(f"{'(a) tvorch launch':<34}{med_a * 1000:>8.1f}ms{p90(tv_times) * 1000:>8.1f}ms")
    print(f"{'(b) virsh create (plain libvirt)':<34}{med_b * 1000:>8.1f}ms{p90(plain_times) * 1000:>8.1f}ms")
    print(f"overhead (a)-(b): {(med_a - med_b) * 1000:.1f} ms")
    verdict = "PASS" if ratio < GOAL_RATIO else "FAIL"
    print(f"ratio (a)/(b): {ratio:.2f}  goal < {GOAL_RATIO}: {verdict}")
    if uncached:
        print(f"warning: {uncached} of {args.runs} tvorch runs hashed the image (digest not cached)")
    return 0 if args.smoke or verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
