#!/usr/bin/env bash
# Builds the istio-init container image without a Docker engine and without a registry.
#
#   image/build.sh                    # -> image/out/istio-init.oci.tar (host architecture)
#   image/build.sh --arch arm64 --bin PATH/TO/aarch64/istio-init --context-only
#
# Steps (each one checked; the script stops at the first failure):
#   1. the static istio-init binary (cargo, +crt-static, explicit --target), unless --bin;
#   2. the Debian packages of iptables and its libraries (`apt-get download`, cached in
#      image/out/debs-<arch>/), unpacked with dpkg-deb into a scratch directory;
#   3. the root filesystem image/out/context/rootfs-<arch>/: only the files listed below, plus
#      every shared library they need (DT_NEEDED, followed with readelf, so it works for any
#      architecture) and the ELF interpreter;
#   4. unless --context-only: `buildah bud` (vfs storage in a throw-away directory, chroot
#      isolation) of image/Containerfile over that context, pushed to an OCI archive.
#
# Needs: bash, coreutils, apt-get, dpkg-deb, readelf (binutils), tar, gzip; cargo unless --bin;
# buildah unless --context-only. Run as root (buildah with vfs storage and chroot isolation).
# Environment: CARGO_TARGET_DIR is honoured; SOURCE_DATE_EPOCH (default: the last commit's
# time) fixes every timestamp, so the same inputs give the same image digest.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

usage() {
    cat <<EOF
usage: image/build.sh [--arch DEB_ARCH] [--bin FILE] [--out DIR] [--tag NAME] [--context-only]

  --arch DEB_ARCH   Debian architecture of the image: amd64 or arm64 (default: this host's)
  --bin FILE        use this static istio-init binary instead of building it with cargo
  --out DIR         output directory (default: image/out)
  --tag NAME        image name inside the archive (default: localhost/istio-init:<version>)
  --context-only    stop after assembling DIR/context (for docker build / buildx elsewhere)
EOF
}

die() {
    echo "image/build.sh: error: $*" >&2
    exit 1
}
say() { echo "image/build.sh: $*" >&2; }

host_arch=$(dpkg --print-architecture)
arch=$host_arch
bin=
out=$repo/image/out
tag=
context_only=false
while [ $# -gt 0 ]; do
    case $1 in
    --arch) arch=${2:?--arch needs a value}; shift 2 ;;
    --bin) bin=${2:?--bin needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a value}; shift 2 ;;
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --context-only) context_only=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done

# Debian architecture -> Rust target and OCI/TARGETARCH name. Only these two are documented;
# another architecture needs its row here (and a static binary).
case $arch in
amd64) rust_target=x86_64-unknown-linux-gnu ;;
arm64) rust_target=aarch64-unknown-linux-gnu ;;
*) die "unsupported --arch $arch (amd64 or arm64)" ;;
esac
oci_arch=$arch
# The multiarch triplet (x86_64-linux-gnu, aarch64-linux-gnu) names the library directories.
triplet=$(dpkg-architecture -a "$arch" -qDEB_HOST_MULTIARCH 2>/dev/null) ||
    die "dpkg-architecture cannot map $arch to a multiarch triplet (apt-get install dpkg-dev)"

for tool in apt-get dpkg-deb readelf tar gzip; do
    command -v "$tool" >/dev/null || die "$tool is required (apt-get install apt dpkg binutils tar gzip)"
done

version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    revision="$revision-dirty"
fi
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
source_url=$(git -C "$repo" remote get-url origin 2>/dev/null || true)
case $source_url in https://*) ;; *) source_url= ;; esac
doc_url=${source_url:+${source_url%.git}/blob/$revision/docs/kubernetes.md}
tag=${tag:-localhost/istio-init:$version}

mkdir -p "$out"
out=$(cd "$out" && pwd)
ctx=$out/context
rootfs=$ctx/rootfs-$oci_arch
work=$(mktemp -d "$out/.work.XXXXXX")
done_ok=false
cleanup() {
    rm -rf "$work"
    # Never leave a half-assembled rootfs in the context for a later docker build to pick up.
    $done_ok || rm -rf "$rootfs"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# 1. The static binary.
if [ -z "$bin" ]; then
    command -v cargo >/dev/null || die "cargo is required to build istio-init (or pass --bin)"
    say "building the static istio-init binary for $rust_target"
    (cd "$repo" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --release --locked --target "$rust_target")
    bin=${CARGO_TARGET_DIR:-$repo/target}/$rust_target/release/istio-init
fi
[ -f "$bin" ] || die "no istio-init binary at $bin"
if readelf -l "$bin" | grep -q 'program interpreter' || readelf -d "$bin" | grep -q '(NEEDED)'; then
    die "$bin is dynamically linked; build it with RUSTFLAGS='-C target-feature=+crt-static' and an explicit --target"
fi

# ---------------------------------------------------------------------------------------------
# 2. Debian packages. Which ones: iptables ships the two multi-call binaries and the
# extensions; the rest is what they link (the closure check in step 3 fails if one is missing).
packages=(iptables libxtables12 libip4tc2 libip6tc2 libnftnl11 libmnl0 libc6)
debs=$out/debs-$arch
mkdir -p "$debs"
have_all() {
    local p
    for p in "${packages[@]}"; do
        compgen -G "$debs/${p}_*_$arch.deb" >/dev/null || compgen -G "$debs/${p}_*_all.deb" >/dev/null || return 1
    done
}
if ! have_all; then
    say "downloading ${packages[*]} ($arch) into $debs"
    apt_opts=(-q -o APT::Sandbox::User=root)
    if [ "$arch" != "$host_arch" ]; then
        # A private apt state for the foreign architecture, using this host's sources: nothing
        # on the host changes (no dpkg --add-architecture).
        a=$out/apt-$arch
        mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
        : >"$a/status"
        apt_opts+=(-o "APT::Architecture=$arch" -o "APT::Architectures=$arch"
            -o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache" -o "Dir::State::status=$a/status")
        apt-get "${apt_opts[@]}" update >&2
    fi
    download() { (cd "$debs" && apt-get "${apt_opts[@]}" download "${packages[@]/%/:$arch}" >&2); }
    if ! download; then
        # Stale or missing package lists (a fresh machine): refresh them once, as root.
        [ "$(id -u)" = 0 ] || die "apt-get download failed; run apt-get update first"
        say "apt-get download failed; running apt-get update and retrying"
        apt-get "${apt_opts[@]}" update >&2 && download || die "apt-get download failed"
    fi
fi
staging=$work/staging
mkdir -p "$staging"
manifest=$work/packages.txt
for p in "${packages[@]}"; do
    deb=$(compgen -G "$debs/${p}_*_$arch.deb" | sort -V | tail -n1)
    dpkg-deb -x "$deb" "$staging"
    dpkg-deb --show --showformat='${Package} ${Version} ${Architecture}\n' "$deb" >>"$manifest"
done

# ---------------------------------------------------------------------------------------------
# 3. The root filesystem.
rm -rf "$rootfs"
mkdir -p "$rootfs"

# Copies one path (file or symlink) from the staging tree into the rootfs, following symlink
# chains so that every link's target is copied too. Paths are absolute inside the tree.
copy_in() {
    local p=$1 t
    [ -e "$rootfs$p" ] || [ -L "$rootfs$p" ] && return 0
    [ -e "$staging$p" ] || [ -L "$staging$p" ] || die "$p is not in the Debian packages ${packages[*]}"
    mkdir -p "$rootfs$(dirname "$p")"
    cp -P --preserve=mode,timestamps "$staging$p" "$rootfs$p"
    if [ -L "$staging$p" ]; then
        t=$(readlink "$staging$p")
        case $t in
        /*) copy_in "$t" ;;
        *) copy_in "$(realpath -m -s "$(dirname "$p")/$t")" ;;
        esac
    fi
}

# The directories the Debian loader searches without an ld.so.cache, in its order.
lib_dirs=(/lib/$triplet /usr/lib/$triplet /lib /usr/lib)
find_lib() {
    local d
    for d in "${lib_dirs[@]}"; do
        if [ -e "$staging$d/$1" ] || [ -L "$staging$d/$1" ]; then
            echo "$d/$1"
            return 0
        fi
    done
    return 1
}

# The iptables programs: both backends' multi-call binaries, their restore/save links (what
# istio-init runs), their plain command links (useful from a debug container:
# `iptables-nft -t nat -L -v -n` shows per-rule counters), and the unsuffixed names pointing at
# the nft backend, as in Istio's own base image.
for fam in iptables ip6tables; do
    for suffix in "" -restore -save; do
        copy_in "/usr/sbin/$fam-nft$suffix"
        copy_in "/usr/sbin/$fam-legacy$suffix"
        ln -s xtables-nft-multi "$rootfs/usr/sbin/$fam$suffix"
    done
done

# The xtables extensions the ruleset uses, loaded with dlopen at run time (ldd does not list
# them). Derived by loading all 27 of Istio's golden rulesets with both backends, both
# families, restore and save, under LD_DEBUG=files: exactly these are opened. Targets: REDIRECT,
# TPROXY, MARK, CONNMARK, CT and the standard verdicts (ACCEPT/DROP/RETURN, jumps); matches:
# tcp, udp, multiport, owner, conntrack, mark, connmark. One libxt_ file serves IPv4 and IPv6.
extensions=(REDIRECT TPROXY MARK CONNMARK CT standard tcp udp multiport owner conntrack mark connmark)
for e in "${extensions[@]}"; do
    copy_in "/usr/lib/$triplet/xtables/libxt_$e.so"
done

# Follows symlinks inside the rootfs (absolute targets are relative to the rootfs, not the host).
resolve() {
    local p=$1 t n=0
    while [ -L "$rootfs$p" ]; do
        n=$((n + 1))
        [ $n -lt 40 ] || die "symlink loop at $1"
        t=$(readlink "$rootfs$p")
        case $t in
        /*) p=$t ;;
        *) p=$(realpath -m -s "$(dirname "$p")/$t") ;;
        esac
    done
    echo "$p"
}

# Shared libraries: the DT_NEEDED closure of every ELF file copied so far, and the interpreter.
declare -A seen=()
queue=()
while IFS= read -r -d '' f; do
    queue+=("${f#"$rootfs"}")
done < <(find "$rootfs" -type f -print0)
interp=
while [ ${#queue[@]} -gt 0 ]; do
    f=${queue[0]}
    queue=("${queue[@]:1}")
    [ -n "${seen[$f]:-}" ] && continue
    seen[$f]=1
    i=$(readelf -l "$rootfs$f" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')
    if [ -n "$i" ]; then
        [ -z "$interp" ] || [ "$interp" = "$i" ] || die "$f wants interpreter $i, others $interp"
        interp=$i
    fi
    for lib in $(readelf -d "$rootfs$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        p=$(find_lib "$lib") || die "$lib (needed by $f) is not in ${packages[*]}: add its package"
        copy_in "$p"
        queue+=("$(resolve "$p")")
    done
done
[ -n "$interp" ] || die "no ELF interpreter found in the iptables binaries"
copy_in "$interp"
# The ELF machine of istio-init must match the packages' (catches an amd64 --bin in an arm64
# image).
machine() { readelf -h "$1" | sed -n 's/^ *Machine: *//p'; }
[ "$(machine "$bin")" = "$(machine "$rootfs/usr/sbin/xtables-nft-multi")" ] ||
    die "$bin is for $(machine "$bin"), the packages are for $(machine "$rootfs/usr/sbin/xtables-nft-multi")"

install -D -m 0755 "$bin" "$rootfs/usr/local/bin/istio-init"

# Users and name service: root and Istio's proxy user/group 1337. NSS reads files only, so
# nothing in the container ever tries DNS or another NSS module (glibc's files backend is built
# into libc.so.6).
mkdir -p "$rootfs/etc"
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
    'istio-proxy:x:1337:1337:istio-proxy:/nonexistent:/sbin/nologin' >"$rootfs/etc/passwd"
printf '%s\n' 'root:x:0:' 'istio-proxy:x:1337:' >"$rootfs/etc/group"
printf '%s\n' 'passwd: files' 'group: files' 'shadow: files' 'hosts: files' >"$rootfs/etc/nsswitch.conf"
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group" "$rootfs/etc/nsswitch.conf"

# Mount points: /run for the legacy backend's xtables lock (a tmpfs or emptyDir when the root
# filesystem is read-only), /tmp.
install -d -m 0755 "$rootfs/run"
install -d -m 1777 "$rootfs/tmp"

# Licences of the Debian packages whose files are in the image, and what was used.
for p in "${packages[@]}"; do
    install -D -m 0644 "$staging/usr/share/doc/$p/copyright" "$rootfs/usr/share/doc/$p/copyright"
done
install -D -m 0644 "$manifest" "$rootfs/usr/share/doc/istio-init/debian-packages.txt"

# Fixed timestamps and ownership, for a reproducible layer.
find "$rootfs" -exec touch -h -d "@$epoch" {} +
chown -R -h 0:0 "$rootfs" 2>/dev/null || true

cp "$here/Containerfile" "$ctx/Containerfile"
rootfs_bytes=$(du -sb "$rootfs" | cut -f1)
say "root filesystem $rootfs: $rootfs_bytes bytes ($(find "$rootfs" -type f | wc -l) files)"
say "Debian packages: $(paste -sd, "$manifest")"

if $context_only; then
    say "context ready: docker build -f image/Containerfile --build-arg TARGETARCH=$oci_arch $ctx"
    done_ok=true
    echo "$ctx"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 4. The image, with buildah: vfs storage in a throw-away directory (nothing shared with other
# users of this machine), chroot isolation (no RUN step exists anyway), pushed to an OCI archive.
command -v buildah >/dev/null || die "buildah is required (apt-get install buildah), or use --context-only"
if [ "$arch" = "$host_arch" ]; then archive=$out/istio-init.oci.tar; else archive=$out/istio-init-$arch.oci.tar; fi
storage=$work/storage
buildah=(buildah --storage-driver vfs --root "$storage/root" --runroot "$storage/run")
"${buildah[@]}" bud --quiet --isolation chroot --platform "linux/$oci_arch" --timestamp "$epoch" \
    --build-arg "TARGETARCH=$oci_arch" --build-arg "VERSION=$version" \
    --build-arg "REVISION=$revision" --build-arg "CREATED=$created" \
    --build-arg "SOURCE=$source_url" --build-arg "DOCUMENTATION=$doc_url" \
    -f "$ctx/Containerfile" -t "$tag" "$ctx" >&2
rm -f "$archive"
"${buildah[@]}" push --quiet "$tag" "oci-archive:$archive:$tag" >&2
"${buildah[@]}" rmi --all >/dev/null 2>&1 || true

# Sizes: the single layer, compressed as a registry stores it and uncompressed.
layer=$(tar -tvf "$archive" | awk '$6 ~ /^blobs\/sha256\// {print $3, $6}' | sort -n | tail -n1 | cut -d' ' -f2)
gz=$(tar -xOf "$archive" "$layer" | wc -c)
raw=$(tar -xOf "$archive" "$layer" | gzip -dc | wc -c)
{
    echo "archive=$archive"
    echo "archive_bytes=$(stat -c %s "$archive")"
    echo "layer_uncompressed_bytes=$raw"
    echo "layer_gzip_bytes=$gz"
    echo "rootfs_bytes=$rootfs_bytes"
} | tee "$out/sizes-$arch.txt" >&2
done_ok=true
echo "$archive"
