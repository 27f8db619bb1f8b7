#!/bin/sh
# Apply benchmark, one command, as root: builds the static release binary (what the image
# ships: +crt-static needs the explicit target, see house style) and runs benches/apply.rs,
# which interleaves istio-init and a bare iptables-nft-restore on fresh namespaces.
#   benches/apply.sh                 # 200 rounds
#   BENCH_ROUNDS=1000 benches/apply.sh
set -eu
cd "$(dirname "$0")/.."
RUSTFLAGS='-C target-feature=+crt-static' exec cargo bench --target x86_64-unknown-linux-gnu --bench apply
