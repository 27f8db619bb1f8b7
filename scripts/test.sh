#!/usr/bin/env bash
# The full test suite — the README's test command, and what CI runs (.ci/run calls it).
# Installs iptables and iproute2 (and buildah, podman and runc for the image tests) when they are
# missing and it can (root + apt-get), then:
# formatting, lints, every test (privileged namespace tests included), and the static build.
# Under CI=true a privileged test that cannot run fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1; }
missing=()
have iptables-nft-restore || missing+=(iptables)
have ip || missing+=(iproute2)
# The image tests (tests/it/image.rs) build with buildah and run with podman on runc.
have buildah || missing+=(buildah)
have podman || missing+=(podman)
have runc || missing+=(runc)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && have apt-get; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "warning: ${missing[*]} missing and cannot be installed here; privileged tests will skip (fail under CI=true)"
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked
echo "== static build"
scripts/build-static.sh
