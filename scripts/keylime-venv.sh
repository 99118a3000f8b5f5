#!/usr/bin/env bash
# A cached virtualenv with Keylime 7.14.3's verifier, for the tests that submit
# tvorch's evidence to a real one (tests/integration/test_keylime.py) and
# benchmarks/keylime_submit.py. Idempotent: quick when the venv is there.
#
#   scripts/keylime-venv.sh [DIR]      (default /var/cache/tvorch/keylime-venv)
#
# Facts behind the steps: the wheel declares no dependencies, so they are
# listed here; Keylime imports `gpg` (Debian's python3-gpg, built for
# /usr/bin/python3 only, not for other interpreters on PATH) and loads
# libefivar1 at run time (scripts/setup-host.sh installs both); the wheel ships
# no config files, so the sdist's templates are kept in DIR/templates for
# `keylime_upgrade_config --defaults`.
set -euo pipefail

DIR=${1:-/var/cache/tvorch/keylime-venv}
VERSION=7.14.3
PY=/usr/bin/python3   # the interpreter Debian's python3-gpg is built for
STAMP="$DIR/.keylime-$VERSION"

[ -e "$STAMP" ] && { echo "keylime-venv: $DIR ready"; exit 0; }

$PY -c 'import gpg' 2>/dev/null || { echo "keylime-venv: $PY cannot import gpg: install python3-gpg (scripts/setup-host.sh)" >&2; exit 1; }
ls /usr/lib/x86_64-linux-gnu/libefivar.so.1* >/dev/null 2>&1 || { echo "keylime-venv: libefivar1 missing (scripts/setup-host.sh)" >&2; exit 1; }

tmp="$DIR.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
mkdir -p "$(dirname "$DIR")"
$PY -m venv "$tmp"
pip=("$tmp/bin/pip" install --quiet --disable-pip-version-check)
"${pip[@]}" "keylime==$VERSION" cryptography sqlalchemy alembic tornado pyyaml requests typing_extensions \
    pyasn1 pyasn1-modules lark packaging jsonschema psutil jinja2 pyzmq
# Debian's gpg binding, and nothing else of dist-packages, into the venv.
site=$("$tmp/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
gpgdir=$($PY -c 'import gpg, os; print(os.path.dirname(gpg.__file__))')
ln -s "$gpgdir" "$site/gpg"
# The config templates are only in the sdist.
"$tmp/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    "keylime==$VERSION" -d "$tmp/sdist"
tar -xzf "$tmp/sdist/keylime-$VERSION.tar.gz" -C "$tmp/sdist"
mv "$tmp/sdist/keylime-$VERSION/templates" "$tmp/templates"
rm -rf "$tmp/sdist"
"$tmp/bin/python" -c 'import gpg, keylime.cloud_verifier_tornado' >/dev/null
# A venv's scripts name their interpreter by path: rebuild it in place under DIR.
rm -rf "$DIR"
mv "$tmp" "$DIR"
sed -i "1s|^#!.*$tmp/bin/python.*|#!$DIR/bin/python|" "$DIR"/bin/* 2>/dev/null || true
sed -i "s|$tmp|$DIR|g" "$DIR/bin/activate" "$DIR/pyvenv.cfg" 2>/dev/null || true
touch "$DIR/.keylime-$VERSION"
echo "keylime-venv: $DIR ready"
