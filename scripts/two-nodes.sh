#!/usr/bin/env bash
# two-nodes: a second libvirt node on this host, for migration tests (issue #18's harness).
#
#   scripts/two-nodes.sh up [DIR]                start node B rooted at DIR (default /var/tmp/tvorch-node-b)
#   scripts/two-nodes.sh uri [DIR]               print B's URI, then A's URI as B reaches it (one per line)
#   scripts/two-nodes.sh exec [DIR] -- CMD ...   run CMD inside B's namespaces (stdin, stdout, exit status its own)
#   scripts/two-nodes.sh down [DIR]              stop B: its domains are destroyed, its daemons stopped, DIR removed
#
# Node B is a libvirtd and virtlogd in their own mount and UTS namespaces: their own
# /etc/libvirt, /var/lib/libvirt, /run/libvirt, /var/log/libvirt, /var/cache/libvirt and
# /run/tvorch (bind mounts of DIR/root/...; /run/tvorch holds tvorch's guest channel sockets
# and boot-file views, which must not collide while one VM runs on both nodes during a
# migration), hostname tvorch-node-b and host_uuid, so libvirt sees another host ("the same
# host" is what it refuses to migrate to). Everything else (the binaries, /var/cache/tvorch,
# /tmp, /var/tmp, the network) is shared. Migration goes over 127.0.0.1 (peer to peer:
# `virsh -c A migrate --live --p2p DOM B-URI --migrateuri tcp://127.0.0.1:PORT`).
# B's cgroups are off (cgroup_controllers = []) so the two daemons never claim one
# cgroup for a domain that runs on both during a migration.
# B has no hook, unless `up` runs with TVORCH_B_CONFIG=/path/to/tvorch.toml: then tvorch's
# hook, pointing at that config, is installed in B's /etc/libvirt/hooks/qemu before B's
# libvirtd starts, run by the interpreter $TVORCH_PYTHON (default: this checkout's .venv).
# `exec` enters B's namespaces (nsenter) and runs CMD there in this directory; it writes
# nothing to stdout itself, so CMD may speak a protocol over stdin/stdout.
# Exit codes: 0 done, 2 usage or not root, 1 a step failed (B not up, for exec);
# exec: otherwise CMD's exit status (126/127: CMD could not be run).
set -euo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
cmd=${1:-}; shift || true
case "$cmd" in
    up|uri|down) dir=${1:-/var/tmp/tvorch-node-b} ;;
    exec)
        dir=/var/tmp/tvorch-node-b
        if [ "${1:-}" != "--" ]; then dir=${1:-}; shift || true; fi
        [ "${1:-}" = "--" ] && [ $# -ge 2 ] || usage
        shift ;;
    *) usage ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "two-nodes: must run as root" >&2; exit 2; }
root=$dir/root
b_uri="qemu+unix:///system?socket=$root/run/libvirt/libvirt-sock"
a_uri="qemu+unix:///system?socket=$dir/a-run/libvirt-sock"  # A's socket, bound there inside B's namespace
PATHS=(etc/libvirt var/lib/libvirt run/libvirt var/log/libvirt var/cache/libvirt run/tvorch)

if [ "$cmd" = uri ]; then
    echo "$b_uri"; echo "$a_uri"; exit 0
fi

# The pid holding B's namespaces: holder.pid is unshare's, the namespaces are its child's (the shell
# that became `sleep infinity`). Empty when B is not up.
ns_pid() {
    local holder child
    holder=$(cat "$dir/holder.pid" 2>/dev/null) || return 0
    child=$(cat "/proc/$holder/task/$holder/children" 2>/dev/null) || return 0
    child=${child%% *}
    [ -z "$child" ] || [ "$(readlink "/proc/$child/ns/mnt")" = "$(readlink /proc/self/ns/mnt)" ] || echo "$child"
}

if [ "$cmd" = exec ]; then
    target=$(ns_pid)
    [ -n "$target" ] || { echo "two-nodes: node B is not up in $dir" >&2; exit 1; }
    exec nsenter --target "$target" --mount --uts --wd="$PWD" -- "$@"
fi

if [ "$cmd" = down ]; then
    if [ -S "$root/run/libvirt/libvirt-sock" ]; then
        # Running domains first (a tvorch domain's hook records its stop in B's store, still in DIR),
        # then every definition with what libvirt keeps beside it.
        for dom in $(virsh -c "$b_uri" list --all --name 2>/dev/null); do
            virsh -c "$b_uri" destroy "$dom" >/dev/null 2>&1 || true
            virsh -c "$b_uri" undefine "$dom" --nvram --tpm --managed-save --snapshots-metadata \
                --checkpoints-metadata >/dev/null 2>&1 || true
        done
    fi
    stop() {  # SIGTERM to each pid, together; SIGKILL to what is left after 5 s
        local pids=() pid alive
        for pid in "$@"; do kill "$pid" 2>/dev/null && pids+=("$pid"); done
        for _ in $(seq 50); do
            alive=""
            for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
            [ -n "$alive" ] || return 0
            sleep 0.1
        done
        for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    }
    daemons=()  # their pid files end without a newline
    for f in libvirtd virtlogd; do pid=$(cat "$dir/$f.pid" 2>/dev/null) && daemons+=("$pid"); done
    stop "${daemons[@]}"
    # Whatever else still runs in B's mount namespace (commands run by exec, a guest's swtpm), then
    # the namespace's holders: unshare (in it too) ignores SIGTERM while its child (`sleep infinity`) runs.
    target=$(ns_pid)
    if [ -n "$target" ]; then
        holder=$(cat "$dir/holder.pid") ns=$(readlink "/proc/$target/ns/mnt") left=()
        for p in /proc/[0-9]*; do
            pid=${p#/proc/}
            [ "$pid" = "$target" ] || [ "$pid" = "$holder" ] || [ "$(readlink "$p/ns/mnt" 2>/dev/null)" != "$ns" ] \
                || left+=("$pid")
        done
        stop "${left[@]}"
        stop "$target" "$holder"
    fi
    rm -rf -- "$dir"
    echo "two-nodes: node B stopped, $dir removed"
    exit 0
fi

# up
repo=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
python=${TVORCH_PYTHON:-$repo/.venv/bin/python}
install_hook() {  # tvorch's hook in B's hooks dir, pointing at $TVORCH_B_CONFIG (checked: it must load)
    [ -x "$python" ] || { echo "two-nodes: no interpreter $python for tvorch's hook (TVORCH_PYTHON)" >&2; exit 1; }
    "$python" - "$root/etc/libvirt/hooks" "$TVORCH_B_CONFIG" "$python" <<'PY' || exit 1
import sys
from pathlib import Path

from tvorch.errors import TvorchError
from tvorch.service.hook_install import install

try:
    install(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
except TvorchError as err:
    sys.exit(f"two-nodes: TVORCH_B_CONFIG: {err}")
PY
}
if [ -S "$root/run/libvirt/libvirt-sock" ] && virsh -c "$b_uri" version >/dev/null 2>&1; then
    if [ -n "${TVORCH_B_CONFIG:-}" ]; then
        # libvirtd runs the hook it found at its start: one there can be re-pointed, none cannot be added.
        [ -f "$root/etc/libvirt/hooks/qemu" ] || {
            echo "two-nodes: node B is up without a hook; run down first to give it one" >&2; exit 1; }
        install_hook
    fi
    echo "two-nodes: node B already up: $b_uri"; exit 0
fi
for p in "${PATHS[@]}"; do mkdir -p "$root/$p"; done
chmod 0755 "$root/run/tvorch"
mkdir -p "$dir/a-run"
cp -a /etc/libvirt/. "$root/etc/libvirt/"
# A's QEMU capabilities: the same binaries, so libvirtd need not probe them again (~8 s here). It
# checks the cache against the binaries, the kernel, itself and the CPUID of the CPU it runs on, and
# probes when one differs (here, with CPUs that differ in CPUID, about one start in two).
[ ! -d /var/cache/libvirt/qemu/capabilities ] || {
    mkdir -p "$root/var/cache/libvirt/qemu"; cp -a /var/cache/libvirt/qemu/capabilities "$root/var/cache/libvirt/qemu/"; }
rm -rf "$root/etc/libvirt/hooks" "$root/etc/libvirt/qemu/autostart" "$root/etc/libvirt/secrets"
find "$root/etc/libvirt/qemu" -maxdepth 1 -name '*.xml' -delete
sed -i '/^[[:space:]]*host_uuid[[:space:]]*=/d' "$root/etc/libvirt/libvirtd.conf"
echo "host_uuid = \"$(cat /proc/sys/kernel/random/uuid)\"" >> "$root/etc/libvirt/libvirtd.conf"
sed -i '/^[[:space:]]*cgroup_controllers[[:space:]]*=/d' "$root/etc/libvirt/qemu.conf"
echo 'cgroup_controllers = [ ]' >> "$root/etc/libvirt/qemu.conf"
[ -z "${TVORCH_B_CONFIG:-}" ] || install_hook
[ -d /run/tvorch ] || mkdir -m 0755 /run/tvorch  # the mount point of B's own /run/tvorch

binds=""
for p in "${PATHS[@]}"; do binds+="mount --bind '$root/$p' '/$p'; "; done
# The holder keeps the namespaces for `down`; the daemons write their pids into DIR.
unshare --mount --uts --propagation private --fork --kill-child sh -c "
    hostname tvorch-node-b
    mount --bind /run/libvirt '$dir/a-run'
    $binds
    virtlogd -d -p '$dir/virtlogd.pid'
    libvirtd -d -p '$dir/libvirtd.pid'
    exec sleep infinity
" </dev/null >"$dir/holder.log" 2>&1 &
echo $! > "$dir/holder.pid"
for _ in $(seq 100); do
    virsh -c "$b_uri" version >/dev/null 2>&1 && { echo "two-nodes: node B up: $b_uri"; exit 0; }
    sleep 0.1
done
echo "two-nodes: node B did not answer; $dir/holder.log says:" >&2
cat "$dir/holder.log" >&2
exit 1
