#!/usr/bin/env bash
# The arm64 (Graviton) checks: cross-compiles the kernel crate's tests and the quantized-model
# tests for aarch64 and runs them under qemu-user, so that the NEON kernels are held to the same
# scalar definition and llama.cpp logits as the x86 ones. qemu says nothing about speed.
#
# Uses rustup's aarch64 standard library when it is installed; otherwise (CI: rustup's server is
# not reachable) Debian's rustc-web, whose arm64 standard library is a Debian package.
# Installs what it needs with apt when it is missing (Debian 12 or later; root or sudo).
set -euo pipefail
cd "$(dirname "$0")/../.."

target=aarch64-unknown-linux-gnu
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
if rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    rustc=$(rustup which rustc)
else
    rustc=/usr/bin/rustc
    [ -d /usr/lib/rustlib/$target ] || missing+=(rustc-web libstd-rust-web-dev:arm64)
fi
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
[ -e /lib/ld-linux-aarch64.so.1 ] || missing+=(libc6:arm64)
if [ ${#missing[@]} -gt 0 ]; then
    as_root dpkg --add-architecture arm64
    as_root apt-get -o Acquire::Retries=3 update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A target dir of its own: the build scripts and proc macros are built by this script's rustc,
# which may not be the one the rest of the tests use.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/arm64-cross"
export RUSTC="$rustc"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# `-L /`: the arm64 libc that Debian's multiarch packages put under /usr/lib/aarch64-linux-gnu,
# with its own loader (the cross toolchain's older loader beside that libc hangs in
# pthread_create).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /"
"$RUSTC" --version
cargo test --locked --target "$target" -p llm-kernels --lib --tests
cargo test --locked --target "$target" -p llm-tests --test quantized --test parity --test generation
