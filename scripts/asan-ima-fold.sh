#!/usr/bin/env bash
# Run the compiled IMA fold's tests with the fold built under AddressSanitizer and
# UndefinedBehaviorSanitizer: an out-of-bounds read on a damaged list aborts the run.
# Manual (README, "Tests"): swaps the built module for the instrumented one while it
# runs and puts it back after.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
SRC=tvorch/core/attestation/_ima_fold.c
SO=$("$VENV/bin/python" -c 'import tvorch.core.attestation._ima_fold as m; print(m.__file__)')
INCLUDE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
backup=$(mktemp)
cp "$SO" "$backup"
trap 'cp "$backup" "$SO"; rm -f "$backup"' EXIT
gcc -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
    -Wall -Wextra -Wno-unused-parameter -fPIC -shared -I"$INCLUDE" "$SRC" -lcrypto -o "$SO"
PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0 \
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/unit/test_ima_fold.py tests/unit/test_ima_judge.py "$@"
