#!/bin/sh
# Installs what aiwimg needs on a Debian 12 (or newer) host, idempotently.
#   builder/setup-host.sh            what `aiwimg build` needs
#   builder/setup-host.sh --tests    plus what the QEMU test suite needs
#   builder/setup-host.sh --packages-only [--tests]   the apt part alone
# Run as root. The image's own tools (systemd-repart, ukify, dracut, ...) come
# from the trixie tools tree that aiwimg makes itself; the host needs little.
set -eu

tests=no
packages_only=no
for arg in "$@"; do
    case "$arg" in
        --tests) tests=yes ;;
        # Only the apt part: used by the suite's check of this script in a
        # throwaway Debian root (qemu-tests/tests/setup_host.rs).
        --packages-only) packages_only=yes ;;
        *) echo "setup-host.sh: unknown option $arg (use --tests, --packages-only)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "setup-host.sh: run as root (sudo $0 $*)" >&2; exit 1; }

. /etc/os-release
# skopeo: `[[container_images]] pull` (images pulled by digest at build time).
# mtools, sbsigntool: `aiwimg inspect --verify` reads the ESP's signed EFI
# binaries and checks their Secure Boot signatures (sbverify).
pkgs="mmdebstrap qemu-utils zstd bmap-tools dpkg util-linux ca-certificates musl-tools skopeo mtools sbsigntool"
if [ "$tests" = yes ]; then
    pkgs="$pkgs qemu-system-x86 ovmf cloud-image-utils genisoimage openssh-client socat e2fsprogs dosfstools postgresql-client redis-tools openssl curl gpg python3 busybox-static docker-registry swtpm swtpm-tools"
    # swtpm: the guest's TPM2 in the test of /var sealed to the TPM (engine-tpm).
    # docker-registry is for the tests, which start their own on 127.0.0.1.
    # Its package would start one on every interface of a systemd host: mask
    # that unit first (only when the package is not installed yet, so a
    # registry someone runs on purpose is left alone).
    if [ -d /run/systemd/system ] && ! dpkg-query -W -f '${Status}' docker-registry 2>/dev/null | grep -q "install ok installed"; then
        systemctl mask docker-registry.service >/dev/null 2>&1 || true
    fi
fi
# On bookworm these come from bookworm-backports (and must all come from the
# same QEMU upload: qemu-system-x86 wants qemu-system-common of exactly its
# own version, and bpo QEMU a newer seabios). Installing them in two apt calls,
# one per suite, is what broke a host set up without --tests and then with it.
backports_pkgs="mmdebstrap qemu-utils qemu-system-x86 qemu-system-common qemu-system-data seabios"

target_release=""
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    # bookworm's mmdebstrap and QEMU are too old for trixie images and OVMF
    # 4M firmware; bookworm-backports has current ones. Its mirror is the one
    # this host already uses for bookworm (never a host name of ours).
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # apt's own reading of every sources file, one-line and deb822 alike.
        uri=$(apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
            | awk '$2=="bookworm" {print $1; exit}')
        [ -n "$uri" ] || { echo "setup-host.sh: cannot find this host's Debian mirror in /etc/apt" >&2; exit 1; }
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" \
            > /etc/apt/sources.list.d/aiwimg-bookworm-backports.sources
        echo "setup-host.sh: added bookworm-backports from $uri"
    fi
    # One pin, so that every apt call (ours, a later `apt upgrade`, a user's
    # own install of a QEMU package) takes the QEMU family and mmdebstrap from
    # bookworm-backports together, whichever command ran first.
    pin=/etc/apt/preferences.d/aiwimg-bookworm-backports
    want_pin="# written by aiwimg builder/setup-host.sh
Package: mmdebstrap qemu-* seabios
Pin: release n=bookworm-backports
Pin-Priority: 990"
    if [ "$(cat "$pin" 2>/dev/null)" != "$want_pin" ]; then
        printf '%s\n' "$want_pin" > "$pin"
        echo "setup-host.sh: pinned mmdebstrap, QEMU and seabios to bookworm-backports ($pin)"
        pin_changed=yes
    fi
    target_release="bookworm-backports"
fi

missing=""
for p in $pkgs; do
    dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
need_bpo=no
if [ -n "$target_release" ]; then
    # An old mmdebstrap/QEMU from bookworm itself is not enough.
    for p in $backports_pkgs; do
        dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || continue
        v=$(dpkg-query -W -f '${Version}' "$p" 2>/dev/null || true)
        case "$v" in *bpo*|*deb13*) ;; *) need_bpo=yes ;; esac
    done
fi
if [ -n "$missing" ] || [ "$need_bpo" = yes ] || [ "${pin_changed:-no}" = yes ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # One call for everything: apt sees the whole set and the pin at once.
    # Packages already installed from the pinned suite are upgraded with it.
    installed_bpo=""
    for p in $backports_pkgs; do
        dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" && installed_bpo="$installed_bpo $p"
    done
    apt-get install -y -q --no-install-recommends $pkgs $installed_bpo
fi
[ "$packages_only" = yes ] && { echo "setup-host.sh: packages ready"; exit 0; }

# The agent is a static musl binary.
if command -v rustup >/dev/null 2>&1; then
    rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
        || rustup target add x86_64-unknown-linux-musl
else
    echo "setup-host.sh: rustup not found; install Rust with the x86_64-unknown-linux-musl target" >&2
    exit 1
fi
# The publish tests run moto[server], a test double of EBS and EC2, from
# the package index pip is configured for, in a venv of its own.
if [ "$tests" = yes ]; then
    venv=/var/cache/aiwimg/moto-venv
    if [ ! -x "$venv/bin/moto_server" ] || ! "$venv/bin/python3" -c 'import moto, boto3' 2>/dev/null; then
        mkdir -p /var/cache/aiwimg
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q 'moto[server]'
        echo "setup-host.sh: installed moto[server] into $venv"
    fi
fi
echo "setup-host.sh: host ready ($( [ "$tests" = yes ] && echo build and tests || echo build ))"
