#!/usr/bin/env bash
# Build tvorch's test guest from Debian packages only, reproducibly, with a cache.
#
# Usage: scripts/build-test-guest.sh [OUTDIR]     (default /var/cache/tvorch/test-guest)
#
# Outputs in OUTDIR (all 0644, OUTDIR 0755 so libvirt's qemu user can read them):
#   guest.qcow2         GPT disk, one FAT ESP with a unified kernel image at EFI/BOOT/BOOTX64.EFI
#   guest-signed.qcow2  the same, UKI signed with OVMF's snakeoil key (boots under
#                       OVMF_CODE_4M.snakeoil.fd + OVMF_VARS_4M.snakeoil.fd, Secure Boot on)
#   vmlinuz, initrd.img kernel and gzip'd busybox initramfs for direct kernel boot; the
#                       initramfs carries tpm2-tools (multi-call binary, its libraries), the
#                       virtio modules for virtio-serial and virtio-rng, and a busybox sh
#                       attestation agent (tvorch-attest/1 on the port org.tvorch.attest.0)
#   build-info.json     versions, sha256 of every output, the cache key
#
# The guest prints "TVORCH-GUEST: ..." lines on its console (ttyS0), see GUEST_INIT below.
# This script installs nothing: the setup script installs linux-image-cloud-amd64
# busybox-static cpio systemd-boot-efi sbsigntool mtools dosfstools fdisk qemu-utils ovmf
# tpm2-tools (which brings the libtss2-* libraries the guest's copy needs).
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
TPM2=/usr/bin/tpm2                        # tpm2-tools' multi-call binary; tpm2_* link to it
# Tools the guest's init uses, and those a guest attestation agent will use; all of the
# package's tpm2_* links are copied (they cost a cpio entry each), these must be there.
TPM2_TOOLS_NEEDED=(tpm2_nvread tpm2_nvdefine tpm2_nvwrite tpm2_nvreadpublic tpm2_getcap
    tpm2_quote tpm2_createek tpm2_createak tpm2_activatecredential tpm2_pcrread)
# tpm2-tss loads its TCTI with dlopen: ldd does not list it.
TCTI_LIBS=(libtss2-tcti-device.so.0)
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
need_tool ldd libc-bin
need_tool nm binutils
need_tool as binutils
need_tool ld binutils
need_file "$STUB" systemd-boot-efi
need_file "$SB_KEY" ovmf
need_file "$SB_CERT" ovmf
need_file "$BUSYBOX" busybox-static
need_file "$TPM2" tpm2-tools
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

# --- virtio modules: the attestation channel and an entropy source -----------------
# The guest agent's channel is a virtio-serial port (virtio_console over virtio_pci), and
# virtio-rng feeds the kernel's random pool, so the first tpm2 tool under TCG does not wait
# for entropy. The cloud kernel builds them as modules; init loads them in the order of
# /lib/modules/virtio.order: dependencies first, as the kernel's modules.dep says (the
# last dependency listed loads first, as modprobe does). A module built into the kernel
# needs nothing; a kernel without virtio-rng just gets no rng device.
VIRTIO_MODULES=(virtio_pci virtio_console)
VIRTIO_OPTIONAL=(virtio_rng)
need_file "$KMODDIR/modules.dep" "linux-image-$KREL"
need_file "$KMODDIR/modules.builtin" "linux-image-$KREL"
# Module name -> its modules.dep line (names compared as modprobe does: - and _ alike).
declare -A MODDEP=() MODBUILTIN=()
while IFS= read -r line; do
    p=${line%%:*}; b=${p##*/}; b=${b%%.ko*}; MODDEP[${b//-/_}]=$line
done < "$KMODDIR/modules.dep"
while IFS= read -r p; do
    b=${p##*/}; b=${b%%.ko*}; MODBUILTIN[${b//-/_}]=1
done < "$KMODDIR/modules.builtin"
VIRTIO_KO=()   # paths relative to KMODDIR, in load order
add_ko() { local p
    for p in "${VIRTIO_KO[@]}"; do [[ $p == "$1" ]] && return 0; done
    VIRTIO_KO+=("$1")
}
resolve_module() { # name required|optional
    local name=$1 line deps i
    [[ -n ${MODBUILTIN[$name]:-} ]] && return 0
    line=${MODDEP[$name]:-}
    if [[ -z $line ]]; then
        [[ $2 == optional ]] && return 0
        die "kernel $KREL has no module $name (not in modules.dep nor modules.builtin)"
    fi
    read -r -a deps <<<"${line#*:}"
    for (( i = ${#deps[@]} - 1; i >= 0; i-- )); do add_ko "${deps[$i]}"; done
    add_ko "${line%%:*}"
}
for m in "${VIRTIO_MODULES[@]}"; do resolve_module "$m" required; done
for m in "${VIRTIO_OPTIONAL[@]}"; do resolve_module "$m" optional; done
for p in "${VIRTIO_KO[@]}"; do
    need_file "$KMODDIR/$p" "linux-image-$KREL"
    # busybox insmod takes plain ELF: compressed modules are decompressed at build time
    # (the bytes out do not depend on the decompressor's version).
    case $p in
    *.ko) ;;
    *.ko.xz) need_tool xz xz-utils ;;
    *.ko.zst) need_tool zstd zstd ;;
    *.ko.gz) ;;
    *) die "unexpected module file $p in $KMODDIR/modules.dep" ;;
    esac
done

# --- tpm2-tools for the guest: binary, libraries, loader ----------------------------
for t in "${TPM2_TOOLS_NEEDED[@]}"; do
    [[ $(readlink "/usr/bin/$t" 2>/dev/null) == tpm2 ]] \
        || die "/usr/bin/$t is not a link to tpm2 (Debian package tpm2-tools 5.x); this script copies only the multi-call binary"
done
TPM2_LINKS=()   # every tpm2_* the package links to the multi-call binary
while read -r f; do
    t=${f##*/}
    # Fetches certificates over HTTPS: needs the libcurl this guest does without (below).
    [[ $t == tpm2_getekcertificate ]] && continue
    [[ $(readlink "$f") == tpm2 ]] && TPM2_LINKS+=("$t")
done < <(dpkg-query -L tpm2-tools | grep '^/usr/bin/tpm2_' | sort)
INTERP=$(readelf -l "$TPM2" | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p')
[[ -n $INTERP && -r $INTERP ]] || die "cannot find the program interpreter of $TPM2"
# The libraries by the name the loader looks for (the file is copied under that name).
declare -A GUEST_LIBS=()
add_libs() { # ELF file: it and what ldd says it loads
    local name arrow path rest
    while read -r name arrow path rest; do
        [[ $arrow == '=>' ]] || continue          # linux-vdso, the loader itself
        [[ $path == /* ]] || die "ldd cannot resolve $name for $1"
        GUEST_LIBS[$name]=$path
    done < <(ldd "$1")
}
declare -A TPM2_LDD=()
while read -r name arrow path rest; do
    [[ $arrow == '=>' && $path == /* ]] && TPM2_LDD[$name]=$path
done < <(ldd "$TPM2")
# libcurl (for tpm2_getekcertificate's downloads) would bring gnutls, krb5, ldap, ssh2 and
# more: about 5 MB of the gzip'd initramfs. The guest gets a stub library of that soname
# instead (built below with binutils): its functions fail, which is all those tools see.
CURL_SONAME=
for name in $(readelf -d "$TPM2" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'); do
    [[ -n ${TPM2_LDD[$name]:-} ]] || die "ldd cannot resolve $name for $TPM2"
    if [[ $name == libcurl* ]]; then CURL_SONAME=$name; continue; fi
    GUEST_LIBS[$name]=${TPM2_LDD[$name]}
    add_libs "${TPM2_LDD[$name]}"
done
TCTI_DIR=$(dirname "${TPM2_LDD[libtss2-tctildr.so.0]:-}")
for l in "${TCTI_LIBS[@]}"; do
    need_file "$TCTI_DIR/$l" "libtss2-tcti-device0"
    GUEST_LIBS[$l]=$TCTI_DIR/$l
    add_libs "$TCTI_DIR/$l"
done
LIBC=${GUEST_LIBS[libc.so.6]:-}
[[ -n $LIBC ]] || die "cannot find libc.so.6 in ldd's answer for $TPM2"
TRIPLET=$(basename "$(dirname "$LIBC")")     # x86_64-linux-gnu: in ld.so's default search path
# The curl functions tpm2 binds at load (BIND_NOW), all with the same version node.
CURL_IMPORTS=()
CURL_VERNODE=
if [[ -n $CURL_SONAME ]]; then
    mapfile -t CURL_IMPORTS < <(nm -D --undefined-only "$TPM2" | awk '$2 ~ /^curl_/ {print $2}' | sort -u)
    CURL_VERNODE=$(printf '%s\n' "${CURL_IMPORTS[@]}" | sed -n 's/^[^@]*@//p' | sort -u)
    [[ $CURL_VERNODE =~ ^[A-Za-z0-9_.]+$ ]] || die "unexpected symbol versions of curl imports in $TPM2: ${CURL_IMPORTS[*]}"
fi

# --- cache key ----------------------------------------------------------------------
KPKG=$(dpkg-query -S "$VMLINUZ" 2>/dev/null | cut -d: -f1) || true
[[ -n $KPKG ]] || die "$VMLINUZ belongs to no Debian package; only packaged kernels are supported"
# Packages whose bytes end up in the outputs (the key must change when any of them does).
PKGS=("$KPKG" busybox-static ovmf systemd-boot-efi sbsigntool binutils mtools fdisk qemu-utils cpio gzip)
# ... and the packages of every file copied for tpm2-tools (tpm2-tools, libtss2-*, libssl3,
# libc6). dpkg knows a file by the path its package ships, which merged /usr may hide.
owner_pkg() { # file -> package
    local f c p
    for f in "$1" "$(readlink -f "$1")"; do
        for c in "$f" "${f#/usr}" "/usr$f"; do
            p=$(dpkg-query -S "$c" 2>/dev/null | grep -v '^diversion' | head -n 1 | cut -d: -f1) || true
            [[ -n $p ]] && { echo "$p"; return 0; }
        done
    done
    die "$1 belongs to no Debian package"
}
INITRD_PKGS=()
for f in "$TPM2" "$INTERP" "${GUEST_LIBS[@]}"; do p=$(owner_pkg "$f"); INITRD_PKGS+=("$p"); done
mapfile -t INITRD_PKGS < <(printf '%s\n' "${INITRD_PKGS[@]}" | sort -u)
mapfile -t PKGS < <(printf '%s\n' "${PKGS[@]}" "${INITRD_PKGS[@]}" | awk '!seen[$0]++')
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
# The virtio modules, decompressed where the package ships them compressed (busybox insmod
# takes plain ELF; Debian appends the signature before compressing, so it stays), and
# their load order.
: > root/lib/modules/virtio.order
for p in "${VIRTIO_KO[@]}"; do
    b=${p##*/}; b=${b%%.ko*}.ko
    [[ -e root/lib/modules/$b ]] && die "two guest modules named $b"
    case $p in
    *.ko) cp "$KMODDIR/$p" "root/lib/modules/$b" ;;
    *.ko.xz) xz -dc "$KMODDIR/$p" > "root/lib/modules/$b" ;;
    *.ko.zst) zstd -qdc "$KMODDIR/$p" > "root/lib/modules/$b" ;;
    *.ko.gz) gzip -dc "$KMODDIR/$p" > "root/lib/modules/$b" ;;
    esac
    chmod 0644 "root/lib/modules/$b"
    echo "$b" >> root/lib/modules/virtio.order
done

# tpm2-tools: the multi-call binary, its links, its libraries (copied under the name the
# loader asks for, so no library symlinks), the loader at the path the binary names.
install -m 0755 "$TPM2" root/usr/bin/tpm2
for t in "${TPM2_LINKS[@]}"; do ln -s tpm2 "root/usr/bin/$t"; done
GLIBDIR=root/usr/lib/$TRIPLET
mkdir -p "$GLIBDIR" "root$(dirname "$INTERP")"
for name in "${!GUEST_LIBS[@]}"; do install -m 0644 "${GUEST_LIBS[$name]}" "$GLIBDIR/$name"; done
install -m 0755 "$(readlink -f "$INTERP")" "root$INTERP"
if [[ -n $CURL_SONAME ]]; then
    # Each stub fails the way libcurl does when it cannot start: an error code from
    # global_init/setopt/perform (2, CURLE_FAILED_INIT), NULL from init/escape/unescape.
    stub_ret() { # symbol -> the body's return instructions
        case $1 in
        curl_global_init|curl_easy_setopt|curl_easy_perform) echo 'movl $2, %eax; ret' ;;
        curl_global_cleanup|curl_easy_cleanup|curl_free) echo 'ret' ;;
        curl_easy_init|curl_easy_escape|curl_easy_unescape) echo 'xorl %eax, %eax; ret' ;;
        curl_easy_strerror) echo 'leaq curl_stub_msg(%rip), %rax; ret' ;;
        *) return 1 ;;
        esac
    }
    {
        echo '.text'
        for sym in "${CURL_IMPORTS[@]}"; do
            sym=${sym%%@*}
            body=$(stub_ret "$sym") || die "$TPM2 needs $sym from $CURL_SONAME, which the guest's stub lacks"
            printf '.globl %s\n.type %s, @function\n%s: %s\n' "$sym" "$sym" "$sym" "$body"
        done
        printf '.section .rodata\ncurl_stub_msg: .asciz "libcurl is not in the tvorch test guest"\n'
        printf '.section .note.GNU-stack,"",@progbits\n'
    } > curl-stub.s
    printf '%s {\n  global: curl_*;\n  local: *;\n};\n' "$CURL_VERNODE" > curl-stub.map
    # No build id, no symbol table (it would name the object file): same bytes every time.
    as -o curl-stub.o curl-stub.s
    ld -shared -s --build-id=none -soname "$CURL_SONAME" --version-script curl-stub.map \
        -z noexecstack -z now --hash-style=gnu -o "$GLIBDIR/$CURL_SONAME" curl-stub.o
    chmod 0644 "$GLIBDIR/$CURL_SONAME"
    rm -f curl-stub.s curl-stub.map curl-stub.o
fi
# Check here, not in the guest: every library resolves inside the initramfs, and tpm2
# starts with them (BIND_NOW: every symbol, the stub's too, binds at start).
for elf in root/usr/bin/tpm2 "${TCTI_LIBS[@]/#/$GLIBDIR/}"; do
    bad=$("$INTERP" --inhibit-cache --library-path "$WORK/$GLIBDIR" --list "$WORK/$elf" \
        | awk -v dir="$WORK/$GLIBDIR/" '/=>/ && index($3, dir) != 1')
    [[ -z $bad ]] || die "$elf needs libraries missing from the initramfs: $bad"
done
"$INTERP" --inhibit-cache --library-path "$WORK/$GLIBDIR" "$WORK/root/usr/bin/tpm2" nvread --version >/dev/null \
    || die "tpm2-tools does not start with the initramfs's libraries"

# busybox acpid maps KEY_POWER from /dev/input/event* to /etc/acpi/PWRF/00000080 and runs it.
cat > root/etc/acpi/PWRF/00000080 <<'EOF'
#!/bin/sh
echo "tvorch-guest: ACPI power button, powering off" > /dev/console
sync
poweroff -f
EOF
chmod 0755 root/etc/acpi/PWRF/00000080

# The guest's attestation agent: tvorch-attest/1 (tvorch/core/attestation/agent_protocol.py) with
# busybox sh and tpm2-tools. scripts/tvorch-guest-agent is the reference agent for real
# guests (Python); this one answers the same requests the same way, except that its
# name is tvorch-test-guest-agent/1. tests/unit/test_guest_agent.py runs it on the
# host too (it finds it by the GUEST_AGENT markers).
cat > root/usr/bin/tvorch-agent <<'GUEST_AGENT'
#!/bin/sh
# tvorch-agent PORT: answer tvorch-attest/1 requests on PORT (/dev/vportNpM) forever.
#   hello                                    -> ok agent=.. ek_public=.. ak_public=.. ak_name=..
#   activate id_object=B64 encrypted_secret=B64 -> ok secret=B64
#   quote nonce=HEX pcrs=BANK:I,J,..         -> ok attest=.. signature=.. pcrs=BANK:I=HEX,..
#                                               eventlog=B64|- ima=B64|-
#   anything else, or a failure              -> error LINE (id 0 if the request's is unreadable)
# The RSA EK is made with tpm2_createek (the key of the EK certificate at NV 0x01c00002),
# the AK (ECC P-256, restricted signing, under the EK) on the first hello, kept at the
# persistent handle 0x81010002. Fields an operation does not use are ignored.
# TPM2TOOLS_TCTI from the environment (default device:/dev/tpmrm0); TVORCH_AGENT_DIR,
# TVORCH_AGENT_EVENTLOG and TVORCH_AGENT_IMA override the work directory and the logs.
PORT=$1
VERSION=tvorch-attest/1
AGENT=tvorch-test-guest-agent/1
AK=0x81010002
EVENTLOG=${TVORCH_AGENT_EVENTLOG:-/sys/kernel/security/tpm0/binary_bios_measurements}
IMA=${TVORCH_AGENT_IMA:-/sys/kernel/security/ima/binary_runtime_measurements}
TOOL_TIMEOUT=60
W=${TVORCH_AGENT_DIR:-/tmp/tvorch-agent}
export TPM2TOOLS_TCTI=${TPM2TOOLS_TCTI:-device:/dev/tpmrm0}
umask 077
[ -n "$PORT" ] || { echo "usage: tvorch-agent PORT" >&2; exit 2; }
mkdir -p "$W" && cd "$W" || exit 1

CR=$(printf '\r')
log() { echo "tvorch-agent: $*" >&2; }
if base64 -w 0 </dev/null >/dev/null 2>&1; then
    b64() { base64 -w 0 < "$1"; }
else
    b64() { base64 < "$1" | tr -d '\n'; }
fi
hex() { od -An -v -tx1 < "$1" | tr -d ' \n'; }
# A log as base64, or "-" when the guest has none (securityfs files stat as empty: read them).
logfield() {
    if [ -r "$1" ] && b64 "$1" > log.b64 2>/dev/null && [ -s log.b64 ]; then cat log.b64; else printf -; fi
}
# run STEP TOOL ARGS: the tool with a deadline, stdout in ./out; on failure ERR says why.
run() {
    step=$1
    shift
    timeout $TOOL_TIMEOUT "$@" > out 2> err 3<&- 4>&-
    rc=$?
    [ $rc -eq 0 ] && return 0
    case $rc in
    124|137|143) ERR="$step: timed out after $TOOL_TIMEOUT s" ;;
    127) ERR="$step: $1 not found" ;;
    *)
        l=$(grep '^ERROR: ' err | grep -v '^ERROR: Unable to run' | head -n 1)
        [ -n "$l" ] || l=$(grep . err | tail -n 1)
        [ -n "$l" ] || l="exit status $rc"
        ERR="$step: ${l#ERROR: }" ;;
    esac
    return 1
}
# Without the kernel's resource manager, what a tool leaves loaded stays in the TPM.
flush_transient() {
    case $TPM2TOOLS_TCTI in
    *tpmrm*) ;;
    *) timeout $TOOL_TIMEOUT tpm2_flushcontext -t > /dev/null 2>&1 ;;
    esac
}
ek() { # [fresh]: the RSA EK's context in ek.ctx, its public area in ek.pub
    [ "$1" != fresh ] && [ -s ek.ctx ] && return 0
    run createek tpm2_createek -G rsa -c ek.ctx -u ek.pub || return 1
    flush_transient    # the saved context is enough; a TPM has few object slots
}
is_b64() {
    case $1 in '' | *[!A-Za-z0-9+/=]* | *=*[!=]* | *===) return 1 ;; esac
    [ $((${#1} % 4)) -eq 0 ]
}
# b64tpm2b NAME VALUE: VALUE decoded onto ./cred, if it is a marshaled TPM2B.
b64tpm2b() {
    is_b64 "$2" || { ERR="$1 is not base64"; return 1; }
    printf '%s' "$2" | base64 -d > blob 2> /dev/null || { ERR="$1 is not base64"; return 1; }
    set -- "$1" $(od -An -tu1 -N2 < blob) $(wc -c < blob)
    [ $# -eq 4 ] && [ $(($2 * 256 + $3 + 2)) -eq "$4" ] \
        || { ERR="$1 is not a marshaled TPM2B (2-byte size, then that many bytes)"; return 1; }
    cat blob >> cred
}

op_hello() {
    ek fresh || return 1
    run getcap tpm2_getcap handles-persistent || return 1
    if grep -qix -- "- $AK" out; then
        run readpublic tpm2_readpublic -c $AK -o ak.pub -n ak.name || return 1
    else
        log "no AK at $AK: making one under the EK"
        run createak tpm2_createak -C ek.ctx -c ak.ctx -G ecc -g sha256 -s ecdsa -u ak.pub -n ak.name \
            || return 1
        flush_transient
        run evictcontrol tpm2_evictcontrol -C o -c ak.ctx $AK || return 1
    fi
    printf 'agent=%s ek_public=%s ak_public=%s ak_name=%s' \
        "$AGENT" "$(b64 ek.pub)" "$(b64 ak.pub)" "$(hex ak.name)" > fields
}

op_activate() {
    [ -n "$f_id_object" ] || { ERR="activate needs id_object="; return 1; }
    [ -n "$f_encrypted_secret" ] || { ERR="activate needs encrypted_secret="; return 1; }
    # tpm2-tools' credential file: magic 0xBADCC0DE, version 1, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
    printf '\272\334\300\336\000\000\000\001' > cred
    b64tpm2b id_object "$f_id_object" || return 1
    b64tpm2b encrypted_secret "$f_encrypted_secret" || return 1
    ek || return 1
    # The EK's policy (TCG's policy A) is PolicySecret(endorsement hierarchy).
    run startauthsession tpm2_startauthsession --policy-session -S session.ctx || return 1
    ok=
    run policysecret tpm2_policysecret -S session.ctx -c e \
        && run activatecredential tpm2_activatecredential -c $AK -C ek.ctx -i cred -o secret \
            -P session:session.ctx \
        && ok=1
    timeout $TOOL_TIMEOUT tpm2_flushcontext session.ctx > /dev/null 2>&1
    [ -n "$ok" ] || { rm -f secret; return 1; }
    printf 'secret=%s' "$(b64 secret)" > fields
    rm -f secret
}

op_quote() {
    case $f_nonce in '' | *[!0-9a-f]*) ERR="nonce is not 1 to 64 bytes of lowercase hex"; return 1 ;; esac
    [ $((${#f_nonce} % 2)) -eq 0 ] && [ ${#f_nonce} -le 128 ] \
        || { ERR="nonce is not 1 to 64 bytes of lowercase hex"; return 1; }
    bank=${f_pcrs%%:*}
    list=${f_pcrs#*:}
    case $bank in
    sha1) size=20 ;; sha256) size=32 ;; sha384) size=48 ;; sha512) size=64 ;;
    *) ERR="pcrs is not <sha1|sha256|sha384|sha512>:<i,j,...>"; return 1 ;;
    esac
    case $list in '' | ,* | *, | *,,* | "$f_pcrs") ERR="pcrs is not <sha1|sha256|sha384|sha512>:<i,j,...>"; return 1 ;; esac
    n=0
    for i in $(echo "$list" | tr , ' '); do
        case $i in [0-9] | 1[0-9] | 2[0-3]) n=$((n + 1)) ;; *) ERR="pcrs lists a PCR outside 0-23"; return 1 ;; esac
    done
    sorted=
    i=0
    while [ $i -le 23 ]; do
        case ",$list," in *",$i,"*) sorted="$sorted $i" ;; esac
        i=$((i + 1))
    done
    set -- $sorted
    [ $# -eq $n ] || { ERR="pcrs lists a PCR twice"; return 1; }
    sel=$(echo $sorted | tr ' ' ,)
    # The tool reads the PCRs right after the quote (-o, raw digests in ascending order);
    # the quote's digest is what the host trusts, and these must match it.
    run quote tpm2_quote -c $AK -l "$bank:$sel" -q "$f_nonce" -g sha256 -m attest -s signature \
        -o pcrs.bin -F values || return 1
    [ "$(wc -c < pcrs.bin)" -eq $((size * $#)) ] || { ERR="quote: PCR values of the wrong size"; return 1; }
    values=
    for h in $(od -An -v -tx1 -w$size < pcrs.bin | tr -d ' '); do
        values="$values,$1=$h"
        shift
    done
    {
        printf 'attest=%s signature=%s pcrs=%s:%s eventlog=' \
            "$(b64 attest)" "$(b64 signature)" "$bank" "${values#,}"
        logfield "$EVENTLOG"
        printf ' ima='
        logfield "$IMA"
    } > fields
}

# handle LINE: sets ID and writes ./answer
handle() {
    ERR=
    ID=0
    set -f
    set -- $1
    set +f
    case $2 in '' | *[!A-Za-z0-9]*) ;; *) [ ${#2} -le 32 ] && ID=$2 ;; esac
    op=$3
    if [ "$1" != "$VERSION" ]; then
        ERR="unsupported protocol '$(echo "$1" | cut -c 1-40)', this agent speaks $VERSION"
    elif [ $# -lt 3 ] || [ "$ID" != "$2" ]; then
        ERR="request is not '$VERSION <id> <op> [key=value ...]'"
    else
        case $op in hello | activate | quote) ;; *) ERR="unknown operation '$(echo "$op" | cut -c 1-40)' (known: hello, activate, quote)" ;; esac
    fi
    if [ -z "$ERR" ]; then
        shift 3
        f_id_object= f_encrypted_secret= f_nonce= f_pcrs= seen=' '
        for w; do
            k=${w%%=*}
            v=${w#*=}
            case $w in *=*) ;; *) ERR="malformed field '$(echo "$w" | cut -c 1-40)'"; break ;; esac
            case $k in '' | [!a-z]* | *[!a-z0-9_]*) ERR="malformed field '$(echo "$w" | cut -c 1-40)'"; break ;; esac
            case $v in *[!A-Za-z0-9+/=:,._-]*) ERR="malformed field '$(echo "$w" | cut -c 1-40)'"; break ;; esac
            case $seen in *" $k "*) ERR="field '$k' given twice"; break ;; esac
            seen="$seen$k "
            case $k in
            id_object) f_id_object=$v ;;
            encrypted_secret) f_encrypted_secret=$v ;;
            nonce) f_nonce=$v ;;
            pcrs) f_pcrs=$v ;;
            esac
        done
    fi
    if [ -z "$ERR" ]; then
        rm -f fields
        if "op_$op"; then
            flush_transient
            { printf '%s %s ok ' "$VERSION" "$ID"; cat fields; echo; } > answer
            log "$ID $op: ok"
            return
        fi
        flush_transient
    fi
    ERR=$(printf '%s' "$ERR" | tr -c ' -~' '?' | cut -c 1-400)
    printf '%s %s error %s\n' "$VERSION" "$ID" "${ERR:-unspecified error}" > answer
    log "$ID ${op:-?}: error: $ERR"
}

# The port reads as end of file while the host end is not connected: close it, wait, open it
# again. A virtio port takes one opener: read and write on one descriptor. After a host end
# that asked something goes, the next usually comes at once (attest after the daemon's):
# look again every 50 ms for 2 s, then every second.
# ("command": a failed exec redirection must not end the shell; 4 keeps stderr, as an exec
# redirection of stderr would last.)
exec 4>&2
quick=0
while :; do
    command exec 3<> "$PORT" 2> /dev/null
    opened=$?
    exec 2>&4
    if [ $opened -eq 0 ]; then
        while IFS= read -r line <&3; do
            line=${line%"$CR"}
            case $line in *[!\ ]*) ;; *) continue ;; esac    # a blank line has no id to answer
            handle "$line"
            cat answer >&3
            quick=40
        done
        exec 3<&-
    fi
    if [ $quick -gt 0 ]; then
        quick=$((quick - 1))
        sleep 0.05
    else
        sleep 1
    fi
done
GUEST_AGENT
chmod 0755 root/usr/bin/tvorch-agent

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

# virtio (in dependency order): the attestation channel's virtio-serial and virtio-rng.
# Loaded first, so the devices probe while the TPM work below runs, and the kernel's
# random pool is filled before the first tpm2 tool asks for random bytes.
while read -r m; do insmod /lib/modules/$m 2>/dev/null; done < /lib/modules/virtio.order

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

# --- TPM NV with tpm2-tools: the EK certificate, and a marker that shows whether
# the vTPM's NV survives from one boot to the next.
EK_CERT_INDEX=0x01c00002      # TCG: RSA 2048 EK certificate (where swtpm_setup puts it)
NV_MARKER_INDEX=0x01000100    # owner index, 16 bytes
# Every tool runs with a deadline, so a wedged TPM cannot keep us from "ready"; after
# one timeout no tool waits on the TPM again. A tool's stderr is kept for tpm_err.
tpm_timed_out=
tpm2run() {
    [ -z "$tpm_timed_out" ] || return 143
    timeout 30 "$@" 2>/tmp/tpm2.err
    set -- $?
    case $1 in 137|143) tpm_timed_out=1 ;; esac
    return "$1"
}
tpm_err() { # step status: one line saying why the last tpm2run failed
    case $2 in 137|143) echo "$1: timed out"; return ;; esac
    l=$(grep '^ERROR: ' /tmp/tpm2.err | grep -v '^ERROR: Unable to run' | head -n 1)
    [ -n "$l" ] || l=$(grep . /tmp/tpm2.err | tail -n 1)
    [ -n "$l" ] || l="exit status $2"
    echo "$1: ${l#ERROR: }" | tr -d '\r' | head -n 1 | cut -c 1-200
}
hex() { od -An -v -tx1 < "$1" | tr -d ' \n'; }
nv_marker() { # prints "stored HEX", "found HEX" or "error LINE"
    if grep -qix -- "- $(printf '0x%x' $NV_MARKER_INDEX)" /tmp/nv-indices; then
        tpm2run tpm2_nvreadpublic $NV_MARKER_INDEX > /tmp/nv.pub || { echo "error $(tpm_err nvreadpublic $?)"; return; }
        if grep -qw written /tmp/nv.pub; then
            tpm2run tpm2_nvread $NV_MARKER_INDEX -C o -s 16 -o /tmp/nv.bin || { echo "error $(tpm_err nvread $?)"; return; }
            [ "$(wc -c < /tmp/nv.bin)" -eq 16 ] || { echo "error nvread: not 16 bytes"; return; }
            echo "found $(hex /tmp/nv.bin)"
            return
        fi
        # Defined but never written: a boot cut short between define and write.
    else
        tpm2run tpm2_nvdefine $NV_MARKER_INDEX -C o -s 16 -a 'ownerread|ownerwrite|authread|authwrite' >/dev/null \
            || { echo "error $(tpm_err nvdefine $?)"; return; }
    fi
    head -c 16 /dev/urandom > /tmp/nv.new
    tpm2run tpm2_nvwrite $NV_MARKER_INDEX -C o -i /tmp/nv.new || { echo "error $(tpm_err nvwrite $?)"; return; }
    tpm2run tpm2_nvread $NV_MARKER_INDEX -C o -s 16 -o /tmp/nv.bin || { echo "error $(tpm_err nvread $?)"; return; }
    cmp -s /tmp/nv.new /tmp/nv.bin || { echo "error nvread: read back differs from what was written"; return; }
    echo "stored $(hex /tmp/nv.bin)"
}
ek_cert() { # the certificate (DER) as base64 between markers, like the event log
    if ! grep -qix -- "- $(printf '0x%x' $EK_CERT_INDEX)" /tmp/nv-indices; then
        say "ekcert none"
        return
    fi
    tpm2run tpm2_nvread $EK_CERT_INDEX -o /tmp/ekcert.der || { say "ekcert error $(tpm_err nvread $?)"; return; }
    [ -s /tmp/ekcert.der ] || { say "ekcert error nvread: empty"; return; }
    say "ekcert-begin"
    base64 < /tmp/ekcert.der
    say "ekcert-end"
}
if [ -c /dev/tpmrm0 ]; then
    export TPM2TOOLS_TCTI=device:/dev/tpmrm0
elif [ -c /dev/tpm0 ]; then
    export TPM2TOOLS_TCTI=device:/dev/tpm0
fi
if [ -z "${TPM2TOOLS_TCTI:-}" ]; then
    say "ekcert none"
    say "nv error no TPM device"
elif tpm2run tpm2_getcap handles-nv-index > /tmp/nv-indices; then
    ek_cert
    say "nv $(nv_marker)"
else
    err=$(tpm_err getcap $?)
    say "ekcert error $err"
    say "nv error $err"
fi

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

# The entropy source the kernel uses ("none" without an rng device: nothing waits on it).
read -r rng 2>/dev/null < /sys/class/misc/hw_random/rng_current || rng=none
say "rng ${rng:-none}"

# The attestation agent on the virtio-serial port named org.tvorch.attest.0: its
# /sys/class/virtio-ports/vportNpM has that name and the device number of /dev/vportNpM
# (devtmpfs makes the node; mknod when it did not). The host announces its ports just
# after virtio_console binds: wait for them up to 2 s, if there is a virtio console.
agent_port() {
    grep -qsx 0x0003 /sys/bus/virtio/devices/*/device || return 1
    i=0
    while :; do
        for n in /sys/class/virtio-ports/vport*/name; do
            [ -r "$n" ] && read -r name < "$n" && [ "$name" = org.tvorch.attest.0 ] || continue
            d=${n%/name}
            d=${d##*/}
            if [ ! -c /dev/$d ]; then
                read -r mm < /sys/class/virtio-ports/$d/dev || return 1
                mknod /dev/$d c ${mm%%:*} ${mm#*:} || return 1
            fi
            echo /dev/$d
            return 0
        done
        [ $i -ge 20 ] && return 1
        usleep 100000
        i=$((i + 1))
    done
}
if port=$(agent_port); then
    say "agent port $port"
    # It answers forever; should it ever exit, it starts again.
    (while :; do tvorch-agent "$port"; sleep 1; done) </dev/null >/dev/console 2>&1 &
else
    say "agent none"
fi

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
    printf '  "tpm2_tools_version": "%s",\n' "$(pkgver tpm2-tools)"
    printf '  "initrd_packages": {'
    sep=
    for pkg in "${INITRD_PKGS[@]}"; do printf '%s"%s": "%s"' "$sep" "$pkg" "$(pkgver "$pkg")"; sep=', '; done
    printf '},\n'
    printf '  "virtio_modules": ['
    sep=
    for p in "${VIRTIO_KO[@]}"; do printf '%s"%s"' "$sep" "$p"; sep=', '; done
    printf '],\n'
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
