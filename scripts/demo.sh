#!/usr/bin/env bash
# `make demo`: launch the test guest with tvorch and leave it running.
# Run it again and it replaces the previous demo VM (its vTPM state too).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
GUEST_DIR=${GUEST_DIR:-/var/cache/tvorch/test-guest}
NAME=${DEMO_NAME:-tvorch-demo}
URI=${LIBVIRT_URI:-qemu:///system}
tvorch() { "$VENV/bin/tvorch" "$@"; }

# vTPM keys are sealed to the host TPM. A machine without one (a laptop, a CI
# runner) gets a swtpm standing in for it, on 127.0.0.1:2321, with its state
# in /var/lib/tvorch/host-tpm-standin, named in a config written only when
# there is none. A real node has /dev/tpmrm0 and needs neither.
CONFIG=${TVORCH_CONFIG:-/etc/tvorch/tvorch.toml}
STANDIN=/var/lib/tvorch/host-tpm-standin
if [ ! -e /dev/tpmrm0 ]; then
    if [ ! -e "$CONFIG" ]; then
        mkdir -p "$(dirname "$CONFIG")"
        cat > "$CONFIG" <<EOF
# Written by 'make demo' on a machine without a TPM: a swtpm on 127.0.0.1:2321
# stands in for the host TPM (scripts/demo.sh starts it). Remove this file on a real node.
[host]
tcti = "swtpm:host=127.0.0.1,port=2321"
EOF
        echo "demo: wrote $CONFIG (a swtpm stands in for the missing host TPM)"
    fi
    if grep -q 'port=2321' "$CONFIG" && ! (exec 3<>/dev/tcp/127.0.0.1/2321) 2>/dev/null; then
        install -d -m 0700 "$(dirname "$STANDIN")" "$STANDIN"   # tvorch's state_dir: 0700, as tvorch makes it
        swtpm socket --tpm2 --server type=tcp,port=2321,bindaddr=127.0.0.1 \
            --ctrl type=tcp,port=2322,bindaddr=127.0.0.1 --flags not-need-init,startup-clear \
            --tpmstate dir="$STANDIN" --pid file="$STANDIN/swtpm.pid" --daemon
        echo "demo: started the stand-in host TPM (swtpm, state in $STANDIN)"
    fi
fi

if tvorch show "$NAME" >/dev/null 2>&1; then
    echo "demo: replacing the previous $NAME"
    tvorch destroy --purge-vtpm "$NAME"
elif virsh -c "$URI" dumpxml "$NAME" 2>/dev/null | grep -q 'https://tvorch.dev/xmlns/instance/1'; then
    # An earlier demo's domain whose tvorch state was wiped (say, by a reset while libvirtd was down):
    # tvorch no longer knows it, so it would refuse the name. It is the demo's own; remove it.
    echo "demo: removing a stale $NAME that this node's tvorch state does not know"
    virsh -c "$URI" destroy "$NAME" >/dev/null 2>&1 || true
    virsh -c "$URI" undefine "$NAME" --nvram --tpm --managed-save >/dev/null
fi

# Reference values: the node trusts the test guest's image (idempotent).
tvorch image trust "$GUEST_DIR/guest.qcow2" --label "tvorch test guest"
tvorch launch "$GUEST_DIR/guest.qcow2" --name "$NAME" --memory 512
tvorch manifest show "$NAME"
# What a verifier elsewhere does, with nothing but the node CA certificate.
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
tvorch ca show --pem > "$out/node-ca.pem"
tvorch manifest show "$NAME" --out "$out/manifest.json" > /dev/null
tvorch manifest verify "$out/manifest.json" --ca "$out/node-ca.pem"
# The vTPM: manufactured by tvorch, its EK certificate issued by the node CA, its state key sealed.
tvorch vtpm show "$NAME"
tvorch vtpm ek "$NAME" --pem > "$out/ek.pem"
openssl verify -CAfile "$out/node-ca.pem" "$out/ek.pem"

log=$(tvorch show --json "$NAME" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["console_log"])')
echo "demo: waiting for the guest to report its vTPM (about 10 s under TCG) ..."
for _ in $(seq 120); do
    grep -q '^TVORCH-GUEST: ready' "$log" 2>/dev/null && break
    sleep 1
done
if ! grep -q '^TVORCH-GUEST: ready' "$log" 2>/dev/null; then
    echo "demo: the guest did not report ready within 120 s; see $log" >&2
    exit 1
fi
echo "demo: what the guest saw of its vTPM:"
grep -E '^TVORCH-GUEST: (tpm|pcr|secureboot|nv)' "$log" | sed 's/^/  /'
echo
# Guest attestation: the guest agent quotes the vTPM; the bundle is verified with only the CA and the nonce.
nonce=$(openssl rand -hex 20)
echo "demo: attesting $NAME (its agent answers once the guest is up) ..."
tvorch attest "$NAME" --nonce "$nonce" --out "$out/bundle.json" --timeout 120
echo "demo: verifying the evidence bundle offline, with the node CA and the nonce only:"
skip=()
if [ ! -e /sys/kernel/security/tpm0/binary_bios_measurements ]; then
    # No measured boot here: no UEFI event log for host attestation ('tvorch host baseline' and
    # 'tvorch serve' on a real node), so the bundle has no host evidence. Say so, and do not count it.
    echo "demo: this machine has no measured boot (no /sys/kernel/security/tpm0/binary_bios_measurements),"
    echo "      so the bundle carries no host evidence: verifying with --skip-check host"
    echo "      (the host check still runs and is shown as SKIPPED; a real node verifies it too)"
    skip=(--skip-check host)
fi
tvorch verify "$out/bundle.json" --ca "$out/node-ca.pem" --nonce "$nonce" "${skip[@]}"
echo
echo "demo: $NAME keeps running. Look at it with '$VENV/bin/tvorch show $NAME' or"
echo "      'virsh console $NAME'; stop it with '$VENV/bin/tvorch stop $NAME' and"
echo "      remove it with '$VENV/bin/tvorch destroy $NAME'."
