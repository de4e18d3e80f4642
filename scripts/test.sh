#!/usr/bin/env bash
# The project's test command (README, .ci/run). Installs what it needs on a fresh Debian 12
# machine with a Rust toolchain: binutils (links the built-in guest), util-linux (setpriv, for the
# unreadable-/dev/kvm test), openssl (the TLS tests make their certificates) and QEMU 10 from
# bookworm-backports (the guest must boot under QEMU too). Then: formatting, clippy, and every
# test, including the ones that boot real guests.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ld >/dev/null 2>&1 || need+=(binutils)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
# QEMU is only for the test that boots our guest under QEMU too; if the archive cannot be reached that
# test says SKIPPED loudly rather than failing everything else.
bash scripts/install-qemu.sh || echo "WARNING: QEMU 10 could not be installed; the QEMU boot test will report SKIPPED"

# The disk tests write disk images of 256 MiB and some tests save whole guests: say how much room
# there is, so that a run that fails on ENOSPC says why at its top.
df -h "${TMPDIR:-/tmp}" . | sed 's/^/disk: /'

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The decoder mutation fuzzer runs for a bounded time (see crates/tern-wire/tests/robustness.rs).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
TERN_FUZZ_SECS=${TERN_FUZZ_SECS:-20} cargo test --workspace 2>&1 | tee "$log"
# One closing line over every test binary (cargo prints one per binary, doc tests last).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
# The side-by-side benchmark's short version (one point, one run), so that bench/ keeps working.
# It reports numbers, it asserts none; it fails only if a VMM breaks.
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
    python3 bench/compare.py --quick --out target/bench-quick
else
    echo "bench: SKIPPED (QEMU 10 could not be installed)"
fi
# The network study's experiment, once, tern only (namespaces it makes and removes): a TCP stream
# through a migration between two hosts; it fails if a byte is lost or the stream does not resume.
python3 bench/network.py --quick --out target/bench-network-quick
