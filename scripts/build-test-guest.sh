#!/usr/bin/env bash
# Build tvorch's test guest from Debian packages only, reproducibly, with a cache.
#
# Usage: scripts/build-test-guest.sh [OUTDIR]     (default /var/cache/tvorch/test-guest)
#
# Outputs in OUTDIR (all 0644, OUTDIR 0755 so libvirt's qemu user can read them):
#   guest.qcow2         GPT disk, one FAT ESP with a unified kernel image at EFI/BOOT/BOOTX64.EFI
#   guest-signed.qcow2  the same, UKI signed with OVMF's snakeoil key (boots under
#                       OVMF_CODE_4M.snakeoil.fd + OVMF_VARS_4M.snakeoil.fd, Secure Boot on)
#   vmlinuz, initrd.img kernel and gzip'd busybox initramfs for direct kernel boot
#   build-info.json     versions, sha256 of every output, the cache key
#
# The guest prints "TVORCH-GUEST: ..." lines on its console (ttyS0), see GUEST_INIT below.
# This script installs nothing: the setup script installs linux-image-cloud-amd64
# busybox-static cpio systemd-boot-efi sbsigntool mtools dosfstools fdisk qemu-utils ovmf.
set -euo pipefail

OUTDIR=${1:-/var/cache/tvorch/test-guest}
[[ $OUTDIR == /* ]] || OUTDIR=$PWD/$OUTDIR   # absolute: the build runs in a temp dir
SELF=$(readlink -f "${BASH_SOURCE[0]}")
PROG=build-test-guest

die() { echo "$PROG: $*" >&2; exit 1; }

# Everything we write is meant to be world-readable (libvirt-qemu reads the images);
# the one secret (the decrypted signing key) gets its own umask below.
umask 022
export LC_ALL=C TZ=UTC
# One fixed time for every file in every image. 1980-01-01 is the earliest time FAT
# can store, so mtools and cpio can share it.
export SOURCE_DATE_EPOCH=315532800

# --- inputs -------------------------------------------------------------------------
STUB=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
SB_KEY=/usr/share/ovmf/PkKek-1-snakeoil.key
SB_CERT=/usr/share/ovmf/PkKek-1-snakeoil.pem
SB_KEY_PASS=snakeoil                      # documented in ovmf's README.Debian
BUSYBOX=/bin/busybox
CMDLINE="console=ttyS0 panic=-1"          # IMA stays at its default (on)
# Fixed identities so two builds give the same disk bytes.
DISK_GUID=54564f52-4348-4755-4553-543030303031
ESP_GUID=54564f52-4348-4755-4553-543030303032
FAT_SERIAL=54564f52
OUTPUTS=(guest.qcow2 guest-signed.qcow2 vmlinuz initrd.img)

need_tool() { # tool package
    command -v "$1" >/dev/null 2>&1 || die "missing tool '$1' (Debian package $2); run the setup script first"
}
need_file() { # file package
    [[ -r $1 ]] || die "missing file '$1' (Debian package $2); run the setup script first"
}
need_tool objcopy binutils
need_tool readelf binutils
need_tool sbsign sbsigntool
need_tool sbattach sbsigntool
need_tool sbverify sbsigntool
need_tool openssl openssl
need_tool mformat mtools
need_tool mmd mtools
need_tool mcopy mtools
need_tool sfdisk fdisk
need_tool qemu-img qemu-utils
need_tool cpio cpio
need_tool gzip gzip
need_tool flock util-linux
need_tool dpkg-query dpkg
need_file "$STUB" systemd-boot-efi
need_file "$SB_KEY" ovmf
need_file "$SB_CERT" ovmf
need_file "$BUSYBOX" busybox-static
# A dynamically linked busybox (package busybox) would need its libraries in the initramfs.
if readelf -l "$BUSYBOX" | grep -q 'Requesting program interpreter'; then
    die "$BUSYBOX is not static (Debian package busybox-static); run the setup script first"
fi

# Newest Debian cloud kernel in /boot.
VMLINUZ=$(find /boot -maxdepth 1 -name 'vmlinuz-*-cloud-amd64' | sort -V | tail -n 1)
[[ -n $VMLINUZ ]] || die "missing /boot/vmlinuz-*-cloud-amd64 (Debian package linux-image-cloud-amd64); run the setup script first"
KREL=${VMLINUZ#/boot/vmlinuz-}
KMODDIR=/lib/modules/$KREL
# The cloud kernel builds these as modules; the guest loads them itself:
# evdev+button for the ACPI power button (graceful shutdown), efivarfs for SecureBoot.
GUEST_MODULES=(kernel/drivers/input/evdev.ko kernel/drivers/acpi/button.ko kernel/fs/efivarfs/efivarfs.ko)
for m in "${GUEST_MODULES[@]}"; do need_file "$KMODDIR/$m" "linux-image-$KREL"; done

# --- cache key ----------------------------------------------------------------------
KPKG=$(dpkg-query -S "$VMLINUZ" 2>/dev/null | cut -d: -f1) || true
[[ -n $KPKG ]] || die "$VMLINUZ belongs to no Debian package; only packaged kernels are supported"
# Packages whose bytes end up in the outputs (the key must change when any of them does).
PKGS=("$KPKG" busybox-static ovmf systemd-boot-efi sbsigntool binutils mtools fdisk qemu-utils cpio gzip)
VERSIONS=$(dpkg-query -W -f '${Package}=${Version}\n' "${PKGS[@]}" 2>/dev/null) \
    || die "cannot read package versions of: ${PKGS[*]} (not all installed?)"
pkgver() { sed -n "s/^$1=//p" <<<"$VERSIONS"; }
SCRIPT_SHA=$(sha256sum "$SELF" | cut -d' ' -f1)
CACHE_KEY=$(printf 'script=%s\nkernel=%s\ncmdline=%s\n%s\n' "$SCRIPT_SHA" "$KREL" "$CMDLINE" "$VERSIONS" \
    | sha256sum | cut -d' ' -f1)

up_to_date() {
    [[ -f $OUTDIR/build-info.json ]] || return 1
    grep -q "\"cache_key\": \"$CACHE_KEY\"" "$OUTDIR/build-info.json" || return 1
    local f
    for f in "${OUTPUTS[@]}"; do [[ -f $OUTDIR/$f ]] || return 1; done
}

mkdir -p "$OUTDIR"
chmod 0755 "$OUTDIR"
# One build at a time per OUTDIR; a second caller waits, then finds the cache fresh.
exec 9>"$OUTDIR/.lock"
flock 9
if up_to_date; then
    echo "test guest up to date: $OUTDIR"
    exit 0
fi

T0=$(date +%s%N)
# Leftovers of a build that was killed (we hold the lock, so none is running).
rm -rf "$OUTDIR"/.build.*
# Build next to the outputs (same filesystem) so the final moves are atomic renames.
WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# On INT/TERM let the running step finish, then exit through the EXIT trap, so no
# child is left writing into a removed directory.
trap 'exit 130' INT
trap 'exit 143' TERM
cd "$WORK"

# --- initramfs ----------------------------------------------------------------------
mkdir -p root/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc/acpi/PWRF,lib/modules}
cp "$BUSYBOX" root/bin/busybox
# Applet symlinks where busybox would install them.
while read -r applet; do
    [[ -e root/$applet || -L root/$applet ]] || ln -s /bin/busybox "root/$applet"
done < <("$BUSYBOX" --list-full | grep -v '^bin/busybox$')
for m in "${GUEST_MODULES[@]}"; do
    # Copied as shipped: Debian signs them, and Secure Boot's lockdown wants the signature.
    install -m 0644 "$KMODDIR/$m" root/lib/modules/
done

# busybox acpid maps KEY_POWER from /dev/input/event* to /etc/acpi/PWRF/00000080 and runs it.
cat > root/etc/acpi/PWRF/00000080 <<'EOF'
#!/bin/sh
echo "tvorch-guest: ACPI power button, powering off" > /dev/console
sync
poweroff -f
EOF
chmod 0755 root/etc/acpi/PWRF/00000080

cat > root/init <<'GUEST_INIT'
#!/bin/sh
# tvorch test guest, PID 1. Prints a report a host can parse from the serial log,
# then waits for the ACPI power button (virsh shutdown) to power off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security
exec </dev/console >/dev/console 2>&1

# Keep kernel messages off the console while we report, so they cannot split our
# lines; every report line is one write(2) starting at column 0.
read -r printk_level printk_rest < /proc/sys/kernel/printk
echo 1 > /proc/sys/kernel/printk

say() { echo "TVORCH-GUEST: $*"; }

say "boot $(uname -r)"

# The TPM drivers are built in but may probe late: wait up to 5 s when ACPI
# describes a TPM (MSFT0101: TPM 2.0 CRB/TIS, PNP0C31: TIS 1.2), else 1 s.
tries=10
ls /sys/bus/acpi/devices 2>/dev/null | grep -qE '^(MSFT0101|PNP0C31):' && tries=50
i=0
while [ ! -e /dev/tpm0 ] || [ ! -d /sys/class/tpm/tpm0/pcr-sha256 ]; do
    [ $i -ge $tries ] && break
    usleep 100000
    i=$((i + 1))
done
if [ -e /dev/tpm0 ]; then
    say "tpm present /dev/tpm0"
    for n in 0 1 2 3 4 5 6 7 8 9; do
        f=/sys/class/tpm/tpm0/pcr-sha256/$n
        [ -r $f ] && say "pcr sha256 $n $(tr 'A-F' 'a-f' < $f)"
    done
else
    say "tpm absent"
fi

# Empty between begin and end when there is no firmware event log.
say "eventlog-begin"
log=/sys/kernel/security/tpm0/binary_bios_measurements
[ -r $log ] && base64 < $log
say "eventlog-end"

# SecureBoot variable: 4 bytes of attributes, then 1 byte (1 = enabled). Read it
# whole: efivarfs files cannot seek, so "od -j4" fails there.
sb=unknown
if [ -d /sys/firmware/efi ]; then
    insmod /lib/modules/efivarfs.ko 2>/dev/null
    if mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null; then
        sb=disabled
        v=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c
        [ -r $v ] && set -- $(od -An -tu1 < $v) && [ "${5:-}" = 1 ] && sb=enabled
    fi
fi
say "secureboot $sb"

# Graceful shutdown: the ACPI power button reaches userspace as KEY_POWER on an
# evdev device (both drivers are modules in the cloud kernel).
insmod /lib/modules/evdev.ko 2>/dev/null
insmod /lib/modules/button.ko 2>/dev/null
i=0
while [ ! -e /dev/input/event0 ] && [ $i -lt 20 ]; do usleep 100000; i=$((i + 1)); done
acpid -f -d -c /etc/acpi &

say "ready"
echo "$printk_level" > /proc/sys/kernel/printk

case " $(cat /proc/cmdline) " in
*" tvorch.poweroff=1 "*)
    sleep 1          # let the UART drain before the power goes
    poweroff -f ;;
esac

# PID 1 must never exit (panic=-1 would reboot the guest).
while :; do sleep 3600; done
GUEST_INIT
chmod 0755 root/init

# Same bytes every time: fixed mtimes, sorted names, no inode numbers, root owner,
# no name/time in the gzip header.
find root -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd root && find . -mindepth 1 -print0 | sort -z \
    | cpio --quiet --null --create --reproducible --format=newc --owner=0:0) \
    | gzip -n -9 > initrd.img

# --- unified kernel image -----------------------------------------------------------
# Our own os-release (not the build host's) so the UKI depends only on the inputs above.
printf 'NAME="tvorch test guest"\nID=tvorch-test-guest\nVERSION_ID="%s"\nPRETTY_NAME="tvorch test guest (%s)"\n' \
    "$KREL" "$KREL" > osrel
printf '%s' "$CMDLINE" > cmdline
cp "$VMLINUZ" vmlinuz
# Section addresses as in systemd's ukify of this era / the Arch wiki (the stub ends
# below 0x20000). Should a kernel ever outgrow the 16 MiB before .initrd, move .initrd
# up to the next MiB after it rather than let the sections overlap.
INITRD_VMA=$(( 0x2000000 + $(stat -c %s vmlinuz) ))
INITRD_VMA=$(( INITRD_VMA < 0x3000000 ? 0x3000000 : (INITRD_VMA + 0xfffff) & ~0xfffff ))
INITRD_VMA=$(printf '0x%x' "$INITRD_VMA")
# -p: keep the stub's PE timestamp (0); without it objcopy 2.40 writes the current
# time into the PE header (it ignores SOURCE_DATE_EPOCH) and every UKI differs.
objcopy -p \
    --add-section .osrel=osrel --change-section-vma .osrel=0x20000 \
    --add-section .cmdline=cmdline --change-section-vma .cmdline=0x30000 \
    --add-section .linux=vmlinuz --change-section-vma .linux=0x2000000 \
    --add-section .initrd=initrd.img --change-section-vma .initrd=$INITRD_VMA \
    "$STUB" uki.efi

# Sign with the snakeoil key. sbsign cannot take a passphrase, so decrypt the key
# to a private (0600, in the 0700 work dir) temp file that lives only as long as the
# signing; the EXIT trap removes it too if we fail on the way.
KEYTMP=$(umask 077; mktemp "$WORK/snakeoil.XXXXXX")
openssl pkey -in "$SB_KEY" -passin "pass:$SB_KEY_PASS" -out "$KEYTMP" 2>/dev/null \
    || die "cannot decrypt $SB_KEY with the passphrase from ovmf's README.Debian"
sbsign --key "$KEYTMP" --cert "$SB_CERT" --output uki-signed.efi uki.efi >/dev/null 2>&1 \
    || die "sbsign failed on the UKI"

# sbsign puts the current time in the signature's signed attributes (signingTime), so
# two signed UKIs never match. Rewrite that time to SOURCE_DATE_EPOCH and redo the
# RSA signature over the attributes (PKCS#1 v1.5 is deterministic); lengths do not
# change, so patching bytes in place is safe. The Authenticode image hash excludes
# the signature, so the messageDigest attribute stays valid.
fix_signing_time() { # signed.efi unsigned.efi
    local signed=$1 unsigned=$2 asn t_off t_hl a_off a_hl a_len s_off s_hl
    sbattach --detach sig.p7 "$signed" >/dev/null 2>&1 || die "cannot detach the UKI signature"
    asn=$(openssl asn1parse -inform DER -in sig.p7)
    # "OFFSET:d=DEPTH hl=HEADERLEN l=LEN ..." ; SignerInfo fields sit at depth 5.
    read -r t_off t_hl < <(awk -F'[:= ]+' '/:signingTime/ {f=1; next}
        f && /UTCTIME/ {print $2, $6; exit}' <<<"$asn") || true
    read -r a_off a_hl a_len < <(awk -F'[:= ]+' '/d=5 .*cont \[ 0 \]/ {print $2, $6, $8}' <<<"$asn" | tail -n 1) || true
    read -r s_off s_hl < <(awk -F'[:= ]+' '/d=5 .*l= *256 prim: *OCTET STRING/ {print $2, $6}' <<<"$asn" | tail -n 1) || true
    [[ -n ${t_off:-} && -n ${a_off:-} && -n ${s_off:-} ]] || die "unexpected signature layout from sbsign"
    printf '%s' "$(TZ=UTC date -d "@$SOURCE_DATE_EPOCH" +%y%m%d%H%M%SZ)" \
        | dd of=sig.p7 bs=1 seek=$((t_off + t_hl)) conv=notrunc status=none
    # What is signed is the attributes' DER as a SET (tag 0x31), not as [0] (0xa0).
    { printf '\x31'; tail -c +$((a_off + 2)) sig.p7 | head -c $((a_hl + a_len - 1)); } > attrs.der
    openssl dgst -sha256 -sign "$KEYTMP" -out rsa.sig attrs.der
    [[ $(stat -c %s rsa.sig) == 256 ]] || die "unexpected RSA signature size"
    dd if=rsa.sig of=sig.p7 bs=1 seek=$((s_off + s_hl)) conv=notrunc status=none
    cp "$unsigned" "$signed"
    sbattach --attach sig.p7 "$signed" >/dev/null 2>&1 || die "cannot attach the UKI signature"
    sbverify --cert "$SB_CERT" "$signed" >/dev/null 2>&1 || die "re-timed UKI signature does not verify"
    rm -f sig.p7 attrs.der rsa.sig
}
fix_signing_time uki-signed.efi uki.efi
rm -f "$KEYTMP"

# --- disk images --------------------------------------------------------------------
DISK_SECTORS=131072                       # 64 MiB
ESP_START=2048
ESP_SECTORS=$((DISK_SECTORS - ESP_START - 2048))   # leave room for the backup GPT
export MTOOLSRC=/dev/null MTOOLS_SKIP_CHECK=1       # ignore any user mtools config

make_disk() { # uki-file out.qcow2
    local uki=$1 out=$2
    rm -f esp.img disk.raw
    truncate -s $((ESP_SECTORS * 512)) esp.img
    mformat -i esp.img -T "$ESP_SECTORS" -h 64 -s 32 -N "$FAT_SERIAL" -v ESP ::
    mmd -i esp.img ::/EFI ::/EFI/BOOT
    touch -d "@$SOURCE_DATE_EPOCH" "$uki"
    mcopy -m -i esp.img "$uki" ::/EFI/BOOT/BOOTX64.EFI
    truncate -s $((DISK_SECTORS * 512)) disk.raw
    sfdisk --quiet --no-reread --no-tell-kernel disk.raw >/dev/null <<EOF
label: gpt
label-id: $DISK_GUID
unit: sectors
first-lba: 2048
start=$ESP_START, size=$ESP_SECTORS, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$ESP_GUID, name="ESP"
EOF
    dd if=esp.img of=disk.raw bs=512 seek="$ESP_START" conv=notrunc,sparse status=none
    # qcow2 carries no timestamps; convert writes the same bytes for the same input.
    qemu-img convert -f raw -O qcow2 disk.raw "$out"
    rm -f esp.img disk.raw
}
make_disk uki.efi guest.qcow2
make_disk uki-signed.efi guest-signed.qcow2

# --- build-info.json and atomic install ---------------------------------------------
sha() { sha256sum "$1" | cut -d' ' -f1; }
{
    printf '{\n'
    printf '  "cache_key": "%s",\n' "$CACHE_KEY"
    printf '  "kernel_release": "%s",\n' "$KREL"
    printf '  "kernel_package": "%s",\n' "$KPKG"
    printf '  "kernel_version": "%s",\n' "$(pkgver "$KPKG")"
    printf '  "busybox_version": "%s",\n' "$(pkgver busybox-static)"
    printf '  "ovmf_version": "%s",\n' "$(pkgver ovmf)"
    printf '  "systemd_boot_efi_version": "%s",\n' "$(pkgver systemd-boot-efi)"
    printf '  "cmdline": "%s",\n' "$CMDLINE"
    printf '  "source_date_epoch": %s,\n' "$SOURCE_DATE_EPOCH"
    printf '  "uki_sha256": {"unsigned": "%s", "signed": "%s"},\n' "$(sha uki.efi)" "$(sha uki-signed.efi)"
    printf '  "sha256": {\n'
    sep=,
    for i in "${!OUTPUTS[@]}"; do
        (( i == ${#OUTPUTS[@]} - 1 )) && sep=
        printf '    "%s": "%s"%s\n' "${OUTPUTS[$i]}" "$(sha "${OUTPUTS[$i]}")" "$sep"
    done
    printf '  }\n}\n'
} > build-info.json

chmod 0644 "${OUTPUTS[@]}" build-info.json
# build-info.json goes first out and last in: while it is missing, the cache check
# fails, so an interrupted install is rebuilt rather than trusted.
rm -f "$OUTDIR/build-info.json"
for f in "${OUTPUTS[@]}"; do mv -f "$f" "$OUTDIR/$f"; done
mv -f build-info.json "$OUTDIR/build-info.json"

ms=$(( ($(date +%s%N) - T0) / 1000000 ))
printf 'test guest built in %d.%03d s: %s\n' $((ms / 1000)) $((ms % 1000)) "$OUTDIR"
