#!/usr/bin/env bash
# two-nodes: a second libvirt node on this host, for migration tests (issue #18's harness).
#
#   scripts/two-nodes.sh up [DIR]     start node B rooted at DIR (default /var/tmp/tvorch-node-b)
#   scripts/two-nodes.sh uri [DIR]    print B's URI, then A's URI as B reaches it (one per line)
#   scripts/two-nodes.sh down [DIR]   stop B: its domains are destroyed, its daemons stopped, DIR removed
#
# Node B is a libvirtd and virtlogd in their own mount and UTS namespaces: their own
# /etc/libvirt, /var/lib/libvirt, /run/libvirt, /var/log/libvirt and /var/cache/libvirt
# (bind mounts of DIR/root/...), hostname tvorch-node-b and host_uuid, so libvirt sees
# another host ("the same host" is what it refuses to migrate to). Everything else (the
# binaries, /var/cache/tvorch, /tmp) is shared. Migration goes over 127.0.0.1 (peer to
# peer: `virsh -c A migrate --live --p2p DOM B-URI --migrateuri tcp://127.0.0.1:PORT`).
# B's cgroups are off (cgroup_controllers = []) so the two daemons never claim one
# cgroup for a domain that runs on both during a migration. B has no hook.
# Exit codes: 0 done, 2 usage or not root, 1 a step failed.
set -euo pipefail

cmd=${1:-}; dir=${2:-/var/tmp/tvorch-node-b}
[ "$(id -u)" -eq 0 ] || { echo "two-nodes: must run as root" >&2; exit 2; }
case "$cmd" in up|uri|down) ;; *) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;; esac
root=$dir/root
b_uri="qemu+unix:///system?socket=$root/run/libvirt/libvirt-sock"
a_uri="qemu+unix:///system?socket=$dir/a-run/libvirt-sock"  # A's socket, bound there inside B's namespace
PATHS=(etc/libvirt var/lib/libvirt run/libvirt var/log/libvirt var/cache/libvirt)

if [ "$cmd" = uri ]; then
    echo "$b_uri"; echo "$a_uri"; exit 0
fi

if [ "$cmd" = down ]; then
    if [ -S "$root/run/libvirt/libvirt-sock" ]; then
        for dom in $(virsh -c "$b_uri" list --all --name 2>/dev/null); do
            virsh -c "$b_uri" destroy "$dom" >/dev/null 2>&1 || true
            virsh -c "$b_uri" undefine "$dom" --nvram --tpm >/dev/null 2>&1 || true
        done
    fi
    for pidfile in "$dir/libvirtd.pid" "$dir/virtlogd.pid" "$dir/holder.pid"; do
        pid=$(cat "$pidfile" 2>/dev/null) || continue
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf -- "$dir"
    echo "two-nodes: node B stopped, $dir removed"
    exit 0
fi

# up
if [ -S "$root/run/libvirt/libvirt-sock" ] && virsh -c "$b_uri" version >/dev/null 2>&1; then
    echo "two-nodes: node B already up: $b_uri"; exit 0
fi
for p in "${PATHS[@]}"; do mkdir -p "$root/$p"; done
mkdir -p "$dir/a-run"
cp -a /etc/libvirt/. "$root/etc/libvirt/"
rm -rf "$root/etc/libvirt/hooks" "$root/etc/libvirt/qemu/autostart" "$root/etc/libvirt/secrets"
find "$root/etc/libvirt/qemu" -maxdepth 1 -name '*.xml' -delete
sed -i '/^[[:space:]]*host_uuid[[:space:]]*=/d' "$root/etc/libvirt/libvirtd.conf"
echo "host_uuid = \"$(cat /proc/sys/kernel/random/uuid)\"" >> "$root/etc/libvirt/libvirtd.conf"
sed -i '/^[[:space:]]*cgroup_controllers[[:space:]]*=/d' "$root/etc/libvirt/qemu.conf"
echo 'cgroup_controllers = [ ]' >> "$root/etc/libvirt/qemu.conf"

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
