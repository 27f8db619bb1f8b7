#!/usr/bin/env bash
# Builds the static release binary and proves it is static: `ldd` must report it as not
# dynamic, and it must run in an empty chroot (no libc, no /etc, no /proc).
# Output: target/<triple>/release/istio-init (path printed on the last line).
set -euo pipefail
cd "$(dirname "$0")/.."
triple=${TARGET:-$(rustc -vV | sed -n 's/^host: //p')}
# +crt-static links glibc statically. The explicit --target keeps the flag away from
# proc-macro crates, which must stay dynamic.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$triple" --bin istio-init
bin="target/$triple/release/istio-init"
if ldd "$bin" 2>&1 | grep -Eq 'not a dynamic executable|statically linked'; then
  echo "static: $(ldd "$bin" 2>&1 | head -n1 | sed 's/^[[:space:]]*//')"
else
  echo "error: $bin is not static:" >&2; ldd "$bin" >&2; exit 1
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
cp "$bin" "$root/istio-init"
if [ "$(id -u)" = 0 ]; then
  chroot "$root" /istio-init --dry-run --ipv6=false >"$root/out" 2>"$root/err" || {
    echo "error: the static binary failed in an empty chroot:" >&2; cat "$root/err" >&2; exit 1; }
  grep -q '^-A ISTIO_OUTPUT -j ISTIO_REDIRECT$' "$root/out"
  echo "empty chroot: dry run ok ($(wc -l <"$root/out") lines)"
else
  echo "note: not root, empty-chroot check skipped"
fi
size=$(stat -c %s "$bin")
echo "size: $size bytes"
# The image's budget for the binary (README, Performance).
budget=$((2 * 1024 * 1024))
if [ "$size" -gt "$budget" ]; then
  echo "error: $bin is $size bytes, over its 2 MiB budget ($budget bytes)" >&2; exit 1
fi
echo "$bin"
