#!/usr/bin/env bash
# reset-node: take a compute node back to what it was before tvorch ran on it.
#
# DESTRUCTIVE. It removes every tvorch instance (its domain, overlay, NVRAM and
# vTPM state: tenants' data), tvorch's state, keys, config, caches, logs and
# its libvirt hook, and stops libvirtd so that it forgets the hook. It is the
# explicit purge that tvorch itself never does; CI runs it so that every run
# starts from a new node rather than from what an earlier run left behind.
#
#   scripts/reset-node.sh          # list what would be removed, change nothing
#   scripts/reset-node.sh --yes    # remove it
#
# Paths come from the tvorch config ($TVORCH_CONFIG, else /etc/tvorch/tvorch.toml)
# when there is one, else from tvorch's defaults. Domains and vTPM states that are
# not tvorch's are left alone: a vTPM state directory is removed only when no
# defined domain has its UUID. Packages, the virtualenv and the test guest's
# build inputs are kept (`make` reinstalls whatever is missing).
# Exit codes: 0 done (or listed), 2 usage or not root, 1 a step failed.
set -uo pipefail

yes=0
for arg in "$@"; do
    case "$arg" in
        --yes) yes=1 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "reset-node: unknown argument '$arg' (only --yes)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "reset-node: must run as root" >&2; exit 2; }

URI=qemu:///system
CONFIG=${TVORCH_CONFIG:-/etc/tvorch/tvorch.toml}
rc=0

# One path per line: state_dir, overlay_dir, console_log_dir, swtpm_state_dir, channel_dir's parent.
paths=$(python3 - "$CONFIG" <<'EOF'
import sys, tomllib
cfg = {}
try:
    with open(sys.argv[1], "rb") as f:
        cfg = tomllib.load(f)
except (OSError, tomllib.TOMLDecodeError):
    pass
def get(key, default, table=None):
    src = cfg.get(table, {}) if table else cfg
    value = src.get(key, default) if isinstance(src, dict) else default
    return value if isinstance(value, str) and value.startswith("/") else default
print(get("state_dir", "/var/lib/tvorch"))
print(get("overlay_dir", "/var/lib/libvirt/images/tvorch"))
print(get("console_log_dir", "/var/log/tvorch"))
print(get("swtpm_state_dir", "/var/lib/libvirt/swtpm"))
print(get("channel_dir", "/run/tvorch/channels", "guest").rstrip("/").rsplit("/", 1)[0] or "/run/tvorch")
print(get("boot_files_dir", "/run/tvorch/boot"))
EOF
) || { echo "reset-node: cannot read $CONFIG" >&2; exit 1; }
mapfile -t P <<<"$paths"
STATE=${P[0]} OVERLAYS=${P[1]} LOGS=${P[2]} SWTPM=${P[3]} RUNDIR=${P[4]} BOOTVIEW=${P[5]}

act() {  # act DESCRIPTION COMMAND...: run it with --yes, else only say it
    if [ $yes -eq 1 ]; then
        "${@:2}" >/dev/null 2>&1 || { echo "reset-node: FAILED: $1" >&2; rc=1; return 1; }
        echo "reset-node: $1"
    else
        echo "would: $1"
    fi
}

libvirt_up() { command -v virsh >/dev/null && virsh -c "$URI" version >/dev/null 2>&1; }

# 1. tvorch's domains (its metadata, or the test suite's prefix) and the secrets it lent libvirt.
if libvirt_up; then
    for dom in $(virsh -c "$URI" list --all --name); do
        xml=$(virsh -c "$URI" dumpxml --inactive "$dom" 2>/dev/null) || continue
        if grep -q 'tvorch.dev/xmlns/instance' <<<"$xml" || [[ $dom == tvtest-* ]]; then
            virsh -c "$URI" domstate "$dom" 2>/dev/null | grep -q '^shut off' ||
                act "stop domain $dom" virsh -c "$URI" destroy "$dom"
            virsh -c "$URI" managedsave-remove "$dom" >/dev/null 2>&1 || true
            act "undefine domain $dom (NVRAM and vTPM state too)" \
                sh -c "virsh -c '$URI' undefine '$dom' --nvram --tpm || virsh -c '$URI' undefine '$dom' --nvram"
        fi
    done
    for uuid in $(virsh -c "$URI" secret-list 2>/dev/null | awk 'NR > 2 && $1 ~ /-/ {print $1}'); do
        if virsh -c "$URI" secret-dumpxml "$uuid" 2>/dev/null | grep -qiE 'tvorch|<usage type=.vtpm.>'; then
            act "remove libvirt secret $uuid" virsh -c "$URI" secret-undefine "$uuid"
        fi
    done
else
    # libvirtd is down: its persistent definitions would come back with it, naming instances whose
    # tvorch state is about to go. Remove them where libvirtd keeps them (what undefine removes).
    for xmlfile in /etc/libvirt/qemu/*.xml; do
        [ -f "$xmlfile" ] || continue
        dom=$(basename "$xmlfile" .xml)
        if grep -q 'tvorch.dev/xmlns/instance' "$xmlfile" || [[ $dom == tvtest-* ]]; then
            act "remove libvirt's definition of $dom (libvirtd is not running)" \
                rm -f -- "$xmlfile" "/etc/libvirt/qemu/autostart/$dom.xml" "/var/lib/libvirt/qemu/save/$dom.save" \
                         "/var/lib/libvirt/qemu/nvram/${dom}_VARS.fd"
        fi
    done
fi

# 2. vTPM states no defined domain owns (a defined domain's state is not tvorch's to take).
if [ -d "$SWTPM" ]; then
    defined=" $(libvirt_up && virsh -c "$URI" list --all --uuid | tr '\n' ' ') "
    for dir in "$SWTPM"/*; do
        [ -e "$dir" ] || continue
        uuid=$(basename "$dir")
        [[ $defined == *" $uuid "* ]] && continue
        act "remove vTPM state $dir" rm -rf -- "$dir"
    done
    [ $yes -eq 1 ] && rmdir -- "$SWTPM" 2>/dev/null && echo "reset-node: removed empty $SWTPM"
fi

# 2b. A second node from scripts/two-nodes.sh (make two-nodes, or a test that died with it up).
for nodeb in /var/tmp/tvorch-node-b /var/tmp/tvtest-node-b-*; do
    [ -d "$nodeb" ] && act "stop node B in $nodeb" "$(dirname "$0")/two-nodes.sh" down "$nodeb"
done

# 3. Processes: tvorch serve, swtpm processes serving tvorch (the demo's stand-in host TPM,
#    test fixtures), then libvirtd and virtlogd, which keep the old hook until they restart.
for pid in $(pgrep -f 'tvorch(\.cli)? serve|tvorch\.daemon'); do
    act "stop tvorch serve (pid $pid)" kill "$pid"
done
for pid in $(pgrep -x swtpm); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE "tvorch|$SWTPM|$STATE"; then
        act "stop swtpm (pid $pid)" kill "$pid"
    fi
done
for daemon in libvirtd virtlogd; do
    pid=$(cat "/run/$daemon.pid" 2>/dev/null || pgrep -x "$daemon" | head -n 1)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        if [ -d /run/systemd/system ] && systemctl is-active -q "$daemon.service" 2>/dev/null; then
            act "stop $daemon (systemd)" systemctl stop "$daemon.service"
        else
            act "stop $daemon (pid $pid)" sh -c "kill $pid; for i in \$(seq 50); do kill -0 $pid 2>/dev/null || exit 0; sleep 0.2; done; exit 1"
        fi
    fi
done

# 4. The tvorch Debian package (`make deb`), if one is installed: its hook, /opt/tvorch, its unit.
if dpkg-query -W -f='${Status}' tvorch 2>/dev/null | grep -q 'install ok installed'; then
    act "purge the tvorch package" env DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq tvorch
fi

# 5. Files. First the read-only view of the staged direct-boot files (boot_files_dir), a bind mount
#    (one per namespace that made it; stacked ones too), so that its directory can go.
while grep -q " $BOOTVIEW " /proc/self/mountinfo 2>/dev/null; do
    act "unmount $BOOTVIEW (read-only view of direct-boot files)" umount -l "$BOOTVIEW" || break
    [ $yes -eq 1 ] || break
done
for path in "$STATE" "$OVERLAYS" "$LOGS" "$RUNDIR" "$BOOTVIEW" /etc/tvorch /var/cache/tvorch \
            /etc/libvirt/hooks/qemu.d/50-tvorch; do
    [ -e "$path" ] || [ -L "$path" ] || continue
    act "remove $path" rm -rf -- "$path"
done
# libvirt's hook itself, only when it is tvorch's (a shim that runs tvorch's hook).
if [ -e /etc/libvirt/hooks/qemu ] && grep -q tvorch /etc/libvirt/hooks/qemu 2>/dev/null; then
    act "remove /etc/libvirt/hooks/qemu (tvorch's hook)" rm -f -- /etc/libvirt/hooks/qemu
fi
for nvram in /var/lib/libvirt/qemu/nvram/tvtest-*; do
    [ -e "$nvram" ] && act "remove $nvram" rm -f -- "$nvram"
done

if [ $yes -eq 0 ]; then
    echo "reset-node: nothing changed; run with --yes to remove the above (tenants' vTPM states included)"
elif [ $rc -eq 0 ]; then
    echo "reset-node: this node holds nothing of tvorch's now"
fi
exit $rc
