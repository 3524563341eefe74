#!/usr/bin/env sh
# The base image from Debian's own packages, where no registry can be pulled from (an
# air-gapped build host, a registry mirror not set up yet):
#   sudo docker/base-image.sh [IMAGE] [MIRROR]
# builds Debian trixie with debootstrap (variant minbase, as the official images are made)
# and imports it as IMAGE (default debian:trixie-slim), which docker/Dockerfile starts
# FROM: the same distribution and packages as the official image. Slim as that image is:
# no documentation, man pages or translations, and dpkg told to leave them out of every
# package installed later; apt's lists and caches removed. MIRROR: the Debian mirror
# (default http://deb.debian.org/debian; an internal one on an air-gapped network). The
# security updates come from MIRROR's debian-security sibling, or DEBIAN_SECURITY_MIRROR.
# Needs root (debootstrap), debootstrap and debian-archive-keyring, and docker or podman
# (ENGINE, by default the one `make image` would use). About a minute.
set -eu

image=${1:-debian:trixie-slim}
mirror=${2:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-${mirror%/debian}/debian-security}
suite=trixie
if [ -z "${ENGINE:-}" ]; then
    if docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/base-image.XXXXXX")
trap 'rm -rf "$root"' EXIT INT TERM

echo "debootstrap $suite from $mirror into $root"
debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$suite" "$root" "$mirror" >"$root.log" 2>&1 || { cat "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# What the official slim image configures (debuerreotype's minimizing config and slimify).
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
EOF
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
cat >"$root/etc/apt/apt.conf.d/docker-no-languages" <<'EOF'
Acquire::Languages "none";
EOF
cat >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests" <<'EOF'
Apt::AutoRemove::SuggestsImportant "false";
EOF
# No service starts while packages install in a build.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root/usr/share/info/"* "$root/usr/share/locale/"* "$root/usr/share/man/"* "$root/usr/share/groff/"* \
    "$root/usr/share/lintian/overrides/"*

# Sources as the official image has them: the release, its updates and security updates.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin "$root/var/cache/apt/archives/"*.deb \
    "$root/var/log/"*.log "$root/var/log/apt/"* "$root/tmp/"* "$root/root/.bash_history"
: >"$root/etc/machine-id"
# Each host gets its own name from the container runtime.
rm -f "$root/etc/hostname"

tar --numeric-owner -C "$root" -c . | $ENGINE import \
    --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --message "debootstrap --variant=minbase $suite $mirror" - "$image"
echo "imported $image ($($ENGINE image inspect --format '{{.Size}}' "$image") bytes)"
