#!/usr/bin/env bash
# `make demo`: launch the test guest with tvorch and leave it running.
# Run it again and it replaces the previous demo VM (its vTPM state too).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
GUEST_DIR=${GUEST_DIR:-/var/cache/tvorch/test-guest}
NAME=${DEMO_NAME:-tvorch-demo}
tvorch() { "$VENV/bin/tvorch" "$@"; }

if tvorch show "$NAME" >/dev/null 2>&1; then
    echo "demo: replacing the previous $NAME"
    tvorch destroy --purge-vtpm "$NAME"
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
grep -E '^TVORCH-GUEST: (tpm|pcr|secureboot)' "$log" | sed 's/^/  /'
echo
echo "demo: $NAME keeps running. Look at it with '$VENV/bin/tvorch show $NAME' or"
echo "      'virsh console $NAME'; stop it with '$VENV/bin/tvorch stop $NAME' and"
echo "      remove it with '$VENV/bin/tvorch destroy $NAME'."
