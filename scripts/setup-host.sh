#!/usr/bin/env bash
# Install the Debian packages tvorch and its test guest need (Debian 12).
# Idempotent and quick when there is nothing to do.
set -euo pipefail

PACKAGES=(
    # run VMs with a vTPM and measuring firmware
    libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
    qemu-system-x86 qemu-utils swtpm swtpm-tools ovmf tpm2-tools libtss2-dev
    libxml2-utils python3-venv python3-dev
    # build tvorch's compiled IMA fold (setup.py) against libcrypto
    gcc libssl-dev
    # build the test guest
    linux-image-cloud-amd64 busybox-static cpio systemd-boot-efi sbsigntool
    mtools dosfstools fdisk binutils openssl
    # tests: a raw ext4 image without a partition table (mkfs.ext4)
    e2fsprogs
    # tests: an independent PE Authenticode hash for tvorch predict's
    osslsigncode
    # tests: a real Keylime verifier (scripts/keylime-venv.sh) imports gpg and loads libefivar
    python3-gpg libefivar1
    # make deb (dpkg-buildpackage, debhelper), its lintian check, and
    # systemd-analyze for the unit's exposure check (works without systemd as PID 1)
    dpkg-dev debhelper fakeroot lintian systemd
    # tests: the daemon's system calls against the unit's filter
    strace
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-host: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "setup-host: packages present"
