#!/bin/sh
# Apply benchmark, one command, as root: builds the static release binary (what the image
# ships, scripts/build-static.sh) and runs benches/apply.rs against it, which interleaves
# istio-init and a bare iptables-nft-restore on fresh namespaces.
#   benches/apply.sh                 # 200 rounds
#   BENCH_ROUNDS=1000 benches/apply.sh
#   BENCH_MODE=nftables benches/apply.sh
# The binary is the release build itself, not the one `cargo bench` would build for the
# bench profile. It is copied aside first: `cargo bench` writes its own build of the binary to the same path
# (the bench profile shares the release directory), which would otherwise be what is measured.
set -eu
cd "$(dirname "$0")/.."
bin=$(scripts/build-static.sh | tail -n1)
mkdir -p target/apply-bench
cp "$bin" target/apply-bench/istio-init
ISTIO_INIT_BIN="${ISTIO_INIT_BIN:-$PWD/target/apply-bench/istio-init}" \
RUSTFLAGS='-C target-feature=+crt-static' exec cargo bench --target x86_64-unknown-linux-gnu --bench apply
