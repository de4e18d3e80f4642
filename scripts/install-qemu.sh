#!/usr/bin/env bash
# Installs QEMU 10 from Debian's bookworm-backports (the machine's own Debian archive) if missing.
# Used by bench/ and, optionally, by the tests that boot the built-in guest under QEMU.
set -euo pipefail
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    exit 0
fi
src=/etc/apt/sources.list.d/tern-bookworm-backports.sources
if [ ! -f "$src" ]; then
    uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    uri=${uri:-http://deb.debian.org/debian}
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$uri" > "$src"
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null
qemu-system-x86_64 --version | head -1
