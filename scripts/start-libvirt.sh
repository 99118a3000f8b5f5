#!/usr/bin/env bash
# Install tvorch's qemu hook, then make sure libvirtd runs and knows it.
# libvirtd only picks up a hook that existed when it started, so a newly
# installed hook means restarting it (running guests survive that).
set -euo pipefail
VENV=${1:-.venv}
URI=qemu:///system

libvirt_up() { virsh -c "$URI" version >/dev/null 2>&1; }

start_daemons() {
    if [ -d /run/systemd/system ]; then
        systemctl start virtlogd.socket libvirtd.service
    else
        # No systemd here (containers, CI): start the daemons by hand.
        pgrep -x virtlogd >/dev/null || virtlogd -d
        pgrep -x libvirtd >/dev/null || libvirtd -d
    fi
    for _ in $(seq 50); do libvirt_up && return 0; sleep 0.2; done
    echo "start-libvirt: libvirtd did not come up" >&2
    exit 1
}

created=$("$VENV/bin/tvorch" install-hook --json | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["created"])')
if [ "$created" = "True" ] && pgrep -x libvirtd >/dev/null; then
    echo "start-libvirt: new hook installed; restarting libvirtd"
    if [ -d /run/systemd/system ]; then
        systemctl restart libvirtd.service
    else
        pkill -x libvirtd
        for _ in $(seq 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.2; done
    fi
fi
start_daemons
echo "start-libvirt: libvirtd answering, tvorch hook installed"
