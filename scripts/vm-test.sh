#!/usr/bin/env bash
# The microVM test (issue 19): istio-init on the kernels users' nodes run. Boots Debian 12's
# 6.1 LTS kernel — the generic flavour (linux-image-amd64) and the cloud flavour
# (linux-image-cloud-amd64) — under qemu (TCG) with an initramfs holding the static istio-init,
# a static busybox, tests/pod-helper, iptables (nft and legacy), iproute2, nft and the
# netfilter modules; runs tests/vm/cases.sh inside (the conformance cases in both modes and on
# both iptables backends, real connections, --cleanup-only, refused runs, and a kernel without
# TPROXY); runs the same cases on this machine's kernel in fresh namespaces; and fails when a
# case fails or a VM kernel's state differs from the host kernel's (the case and the diff are
# printed).
#
# Needs root, apt-get (Debian's registry) and scripts/build-static.sh's binary. Installs
# qemu-system-x86, cpio, kmod, jq, iptables, iproute2, nftables when missing; the kernels and
# busybox are downloaded (apt-get download) and unpacked under target/vm/, nothing installed.
# Without root or apt-get it skips loudly, except under CI=true where it fails.
#
# VM_KERNELS="amd64 cloud-amd64" (flavours), VM_TIMEOUT=300 (seconds per boot),
# VM_ONLY=REGEX (cases to run), VM_KEEP=1 (keep target/vm/out as it is).
set -euo pipefail
cd "$(dirname "$0")/.."

VM=target/vm
OUT=$VM/out
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
BIN=target/$TRIPLE/release/istio-init
HELPER=$VM/pod-helper/$TRIPLE/release/pod-helper
KERNELS=${VM_KERNELS:-amd64 cloud-amd64}
TIMEOUT=${VM_TIMEOUT:-300}
ONLY=${VM_ONLY:-.}
SHARED=../shared/conformance
PIDS=()

say() { echo "vm-test [$SECONDS s]: $*"; }
die() { echo "vm-test: error: $*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# Cannot run here: a failure under CI, a loud skip elsewhere.
cannot() {
  if [ "${CI:-}" = true ] || [ "${REQUIRE_PRIVILEGED_TESTS:-}" = 1 ]; then
    die "cannot run: $*"
  fi
  echo "skipped: vm-test: cannot run: $*" >&2
  exit 0
}

# Each VM runs in a process group of its own (setsid): killing the group ends qemu too.
stop_vms() {
  local pid
  for pid in "${PIDS[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop_vms EXIT

apt_retry() {
  local i
  for i in $(seq 1 30); do
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 "$@" && return 0
    say "apt-get $1 failed (lock held?), retrying ($i)"
    sleep 5
  done
  die "apt-get $* failed"
}

preflight() {
  [ "$(id -u)" = 0 ] || cannot "not root"
  have apt-get || cannot "no apt-get (the kernels come from Debian's packages)"
  [ -x "$BIN" ] || die "$BIN missing: run scripts/build-static.sh first"
  [ -f "$SHARED/nft-cases.json" ] || cannot "$SHARED not found (the conformance cases)"
  local missing=() tool pkg
  for tool in qemu-system-x86_64:qemu-system-x86 cpio:cpio depmod:kmod jq:jq \
    iptables-legacy-restore:iptables ip:iproute2 nft:nftables setpriv:util-linux; do
    have "${tool%%:*}" || missing+=("${tool#*:}")
  done
  if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt_retry update -qq
    apt_retry install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# The newest 6.1 version of a package (the default candidate may be a backport of another).
version_61() {
  apt-cache madison "$1" | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep '^6\.1\.' |
    sort -V | tail -n 1
}

# Downloads PACKAGE=VERSION into target/vm/debs (once) and prints the .deb's path.
download() {
  local pkg=$1 ver=$2 deb
  mkdir -p "$VM/debs"
  deb=$(find "$VM/debs" -name "${pkg}_${ver/:/%3a}_*.deb" | head -n 1)
  if [ -z "$deb" ]; then
    (cd "$VM/debs" && apt-get -qq -o APT::Sandbox::User=root download "$pkg=$ver" >&2) ||
      die "apt-get download $pkg=$ver failed"
    deb=$(find "$VM/debs" -name "${pkg}_${ver/:/%3a}_*.deb" | head -n 1)
  fi
  [ -n "$deb" ] || die "no .deb for $pkg=$ver"
  echo "$deb"
}

# Unpacks a .deb under target/vm/pkg/NAME (once) and prints the directory.
unpack() {
  local deb=$1 dir
  dir=$VM/pkg/$(basename "$deb" .deb)
  if [ ! -d "$dir" ]; then
    mkdir -p "$VM/pkg"
    dpkg-deb -x "$deb" "$dir.tmp" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

# The kernel image package of a flavour, pinned to 6.1: unpacked, directory printed.
kernel() {
  local meta=linux-image-$1 ver image
  [ -n "$(apt-cache madison "$meta")" ] || apt_retry update -qq
  ver=$(version_61 "$meta")
  [ -n "$ver" ] || die "no 6.1 version of $meta in the package lists"
  image=$(apt-cache show "$meta=$ver" | sed -n 's/^Depends: \(linux-image-[^ ,]*\).*/\1/p' | head -n 1)
  [ -n "$image" ] || die "$meta=$ver names no kernel image package"
  unpack "$(download "$image" "$ver")"
}

busybox_static() {
  local ver
  ver=$(apt-cache madison busybox-static | awk -F'|' '{gsub(/ /, "", $2); print $2; exit}')
  [ -n "$ver" ] || die "busybox-static is not in the package lists"
  echo "$(unpack "$(download busybox-static "$ver")")/bin/busybox"
}

build_helper() {
  say "building tests/pod-helper (static)"
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$VM/pod-helper \
    cargo build -q --release --locked --target "$TRIPLE" \
    --manifest-path tests/pod-helper/Cargo.toml
}

# The case directories cases.sh reads: ipt/CASE (tests/golden) and nft/CASE
# (nft-cases.json), each with argv (one argument per line), env and resolv.conf.
case_data() {
  local data=$1 dir name file line
  mkdir -p "$data/ipt" "$data/nft"
  for dir in tests/golden/*/; do
    name=$(basename "$dir")
    mkdir -p "$data/ipt/$name"
    sed '/^#/d' "$dir/args" >"$data/ipt/$name/argv"
    sed '/^#/d; /^$/d' "$dir/env" >"$data/ipt/$name/env"
    cp "$dir/resolv.conf" "$data/ipt/$name/" 2>/dev/null || : >"$data/ipt/$name/resolv.conf"
  done
  # One jq for all: NAME<TAB>FILE<TAB>LINE per line (FILE `-` creates the case's files).
  jq -r '.base_args as $base | .cases[] | .name as $n
    | "\($n)\t-\t",
      ((["istio-iptables"] + $base + .args
        + ["--native-nftables", "--ipv6=\(.ipv6 // false)"])[] | "\($n)\targv\t\(.)"),
      ((.env // {}) | to_entries[] | "\($n)\tenv\t\(.key)=\(.value)"),
      ((.dns_servers // [])[] | "\($n)\tresolv.conf\tnameserver \(.)")' \
    "$SHARED/nft-cases.json" |
    while IFS=$'\t' read -r name file line; do
      dir=$data/nft/$name
      if [ "$file" = - ]; then
        mkdir -p "$dir"
        : >"$dir/argv" && : >"$dir/env" && : >"$dir/resolv.conf"
      else
        printf '%s\n' "$line" >>"$dir/$file"
      fi
    done
  [ "$(find "$data/nft" -name argv | wc -l)" = 28 ] || die "nft-cases.json: expected 28 cases"
}

# Copies programs (as their real files, under their own names) and their shared libraries.
copy_programs() {
  local root=$1 prog real lib
  shift
  for prog in "$@"; do
    real=$(readlink -f "$(command -v "$prog")")
    mkdir -p "$root$(dirname "$real")"
    cp -n "$real" "$root$real"
    for lib in $(ldd "$real" | grep -o '/[^ ]*'); do
      mkdir -p "$root$(dirname "$lib")"
      cp -nL "$lib" "$root$lib"
    done
  done
}

# Links NAME → TARGET in /usr/sbin (xtables-*-multi dispatch on their name).
link_sbin() {
  local root=$1 target=$2 name
  shift 2
  for name in "$@"; do ln -sf "$target" "$root/usr/sbin/$name"; done
}

# The modules the cases need, as paths under lib/modules/VERSION: the netfilter modules,
# veth, and what they depend on — libcrc32c finds its crc32c implementation by alias, not by
# dependency, so those are named. Fewer modules: a smaller initramfs to unpack and
# modules.dep to parse under TCG.
needed_modules() {
  local dir=$1
  [ -f "$dir/modules.dep" ] || depmod -b "${dir%/lib/modules/*}" "${dir##*/}"
  awk -F': *' '
    { deps[$1] = $2 }
    $1 ~ /^kernel\/(net\/(netfilter|ipv4\/netfilter|ipv6\/netfilter)\/|drivers\/net\/veth)/ { keep[$1] = 1 }
    $1 ~ /^kernel\/(crypto\/crc32c_generic|arch\/x86\/crypto\/crc32c-intel)\./ { keep[$1] = 1 }
    END {
      do {
        grown = 0
        for (m in keep) {
          n = split(deps[m], d, " ")
          for (i = 1; i <= n; i++) if (!(d[i] in keep)) { keep[d[i]] = 1; grown = 1 }
        }
      } while (grown)
      for (m in keep) print m
    }' "$dir/modules.dep"
}

# The initramfs of one kernel (unpacked package directory): printed path of the cpio.
initramfs() {
  local kdir=$1 busybox=$2 data=$3 root kver m d lib dest
  kver=$(basename "$(ls -d "$kdir"/lib/modules/*)")
  root=$VM/root-$kver
  rm -rf "$root"
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,etc,proc,sys,dev,run,tmp,vm}
  cp "$busybox" "$root/bin/busybox"
  for d in $("$busybox" --list-full); do
    [ -e "$root/$d" ] || [ "$d" = sbin/modprobe ] || ln -s /bin/busybox "$root/$d"
  done
  # Programs busybox also has an applet for (ip, setpriv) must be the real ones.
  rm -f "$root/sbin/ip" "$root/bin/ip" "$root/usr/bin/setpriv" "$root/bin/setpriv"
  copy_programs "$root" xtables-nft-multi xtables-legacy-multi ip nft setpriv
  [ -x "$root/usr/sbin/ip" ] || ln -sf "$(readlink -f "$(command -v ip)")" "$root/usr/sbin/ip"
  for fam in iptables ip6tables; do
    for b in nft legacy; do
      link_sbin "$root" "xtables-$b-multi" "$fam-$b" "$fam-$b-restore" "$fam-$b-save"
    done
  done
  lib=/usr/lib/x86_64-linux-gnu/xtables
  mkdir -p "$root$lib"
  cp -a "$lib/." "$root$lib/"
  cp /etc/protocols /etc/services "$root/etc/"
  echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
  printf 'root:x:0:\njava:x:1001:\nftp:x:1002:\n' >"$root/etc/group"
  cp "$BIN" "$root/usr/local/bin/istio-init"
  cp "$HELPER" "$root/usr/local/bin/pod-helper"
  cp tests/vm/cases.sh "$root/vm/"
  cp -a "$data" "$root/vm/data"
  echo "$ONLY" >"$root/vm/only"
  install -m 755 tests/vm/init "$root/init"
  install -m 755 tests/vm/modprobe "$root/sbin/modprobe"
  # The modules, with depmod's files for busybox modprobe (the kernel's autoloader here).
  m=lib/modules/$kver
  mkdir -p "$root/$m"
  dest=$(realpath "$root/$m")
  needed_modules "$kdir/$m" | (cd "$kdir/$m" && xargs cp --parents -t "$dest")
  cp "$kdir/$m"/modules.{order,builtin,builtin.modinfo} "$root/$m/"
  depmod -b "$root" "$kver"
  (cd "$root" && find . | cpio -o -H newc --quiet) >"$VM/initramfs-$kver.cpio"
  rm -rf "$root"
  echo "$VM/initramfs-$kver.cpio"
}

# Boots one kernel in the background: console on ttyS0 ($OUT/NAME.console), the cases'
# output on ttyS1 ($OUT/NAME.log). The pid joins PIDS.
boot() {
  local name=$1 kernel=$2 initrd=$3
  # The VM's wall and CPU time (on an idle core the two are about equal).
  TIMEFORMAT="%R s wall, %U s user + %S s sys" setsid \
    bash -c 'time "$@"' time timeout --foreground --kill-after=10 "$TIMEOUT" qemu-system-x86_64 -accel tcg -m 1024 -smp 1 \
    -nographic -no-reboot -nic none -monitor none \
    -serial "file:$OUT/$name.console" -serial "file:$OUT/$name.log" \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4" \
    </dev/null >"$OUT/$name.qemu" 2>&1 &
  PIDS+=("$!")
}

# Prints the block of one case (without its markers) from a log.
block() {
  awk -v c="$2" '$0 == "@@case " c {on = 1; next} $0 == "@@end " c {on = 0} on' "$1"
}

cases_in() {
  sed -n 's/^@@case //p' "$1" | sort
}

# One log's own verdict: it finished, and no case failed.
check_log() {
  local name=$1 log=$2
  if ! grep -q '^@@done ' "$log"; then
    echo "== $name: the cases did not finish; console:" >&2
    tail -n 30 "$OUT/$name.console" "$log" >&2 2>/dev/null
    return 1
  fi
  if grep -q '^@@fail ' "$log"; then
    echo "== $name: failed cases:" >&2
    grep '^@@fail ' "$log" >&2
    return 1
  fi
  say "$name: $(grep '^@@done ' "$log" | sed 's/^@@done //')"
}

# A VM kernel's states against the host's, case by case.
compare() {
  local name=$1 log=$2 host=$3 c bad=0
  if [ "$(cases_in "$host")" != "$(cases_in "$log" | grep -v '^vmonly-')" ]; then
    echo "== $name: the cases differ from the host's:" >&2
    diff <(cases_in "$host") <(cases_in "$log" | grep -v '^vmonly-') >&2 || true
    bad=1
  fi
  for c in $(cases_in "$host"); do
    if ! diff -u --label "host/$c" --label "$name/$c" <(block "$host" "$c") \
      <(block "$log" "$c") >"$OUT/diff" 2>&1; then
      echo "== $name: $c differs from the host kernel:" >&2
      cat "$OUT/diff" >&2
      bad=1
    fi
  done
  [ "$bad" = 0 ] && say "$name: $(cases_in "$host" | wc -l) cases equal to the host kernel's"
  return "$bad"
}

main() {
  local data busybox flavour kdir kver initrd ok=0 vms=()
  SECONDS=0
  preflight
  # One run at a time: they share target/vm.
  mkdir -p "$VM"
  exec 9>"$VM/.lock"
  flock -n 9 || { say "another vm-test is running; waiting"; flock 9; }
  build_helper
  rm -rf "$OUT"
  mkdir -p "$OUT"
  data=$OUT/data
  case_data "$data"
  busybox=$(busybox_static)
  for flavour in $KERNELS; do
    kdir=$(kernel "$flavour")
    kver=$(basename "$(ls -d "$kdir"/lib/modules/*)")
    initrd=$(initramfs "$kdir" "$busybox" "$data")
    say "booting $kver ($(du -h "$initrd" | cut -f1) initramfs)"
    boot "$kver" "$kdir/boot/vmlinuz-$kver" "$initrd"
    vms+=("$kver")
  done
  say "host kernel $(uname -r): the same cases in fresh namespaces"
  local TIMEFORMAT="vm-test: host: the cases took %R s"
  time II=$PWD/$BIN HELPER=$PWD/$HELPER IPR=$(command -v ip) SETPRIV=$(command -v setpriv) \
    DATA=$PWD/$data WHERE=host ONLY=$ONLY timeout --kill-after=10 "$TIMEOUT" \
    sh tests/vm/cases.sh >"$OUT/host.log" 2>&1 || true
  check_log host "$OUT/host.log" || ok=1
  for pid in "${PIDS[@]}"; do wait "$pid" || true; done
  PIDS=()
  for kver in "${vms[@]}"; do
    tr -d '\r' <"$OUT/$kver.log" >"$OUT/$kver.txt" 2>/dev/null || : >"$OUT/$kver.txt"
    say "$kver: qemu $(tail -n 1 "$OUT/$kver.qemu")"
    check_log "$kver" "$OUT/$kver.txt" || ok=1
    compare "$kver" "$OUT/$kver.txt" "$OUT/host.log" || ok=1
  done
  say "done; logs in $OUT"
  [ "$ok" = 0 ] || die "the microVM test failed"
}

main "$@"
