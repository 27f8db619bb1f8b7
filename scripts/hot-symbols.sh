#!/usr/bin/env bash
# Regenerates link/hot-symbols.txt, the symbol ordering file build.rs hands to lld for static
# builds (`--symbol-ordering-file`): the functions a run executes, placed together at the start
# of .text, so that a run touches a few 64 KiB fault-around windows of the binary instead of all
# of them (peak RSS, page faults). Needs root (fresh network namespaces), gdb and unshare.
#
#   sudo scripts/hot-symbols.sh        # then commit link/hot-symbols.txt
#
# Rerun it when the start-up or apply path changes. A stale file only degrades: names that no
# longer exist are skipped by lld (build.rs silences its warnings), new functions land in the
# cold part.
#
# How: it builds the static release binary exactly as scripts/build-static.sh does, into
# target/hot, with a linker map as the only addition. Not an unstripped build: the `strip`
# setting is part of cargo's -C metadata, which every Rust symbol's hash comes from, so an
# unstripped build's names would not match the release build's. RUSTFLAGS are not part of it,
# so the map flags are passed there. Then it runs the binary under gdb with a one-shot
# breakpoint at the start of every .text input section and every symbol in the map (exact, and
# natively: glibc picks the same ifunc variants, e.g. memcpy's, as a real run does), for the
# jobs below, each in a fresh network namespace, and writes the executed sections' symbols
# (mangled, as lld sees them) in first-execution order: the nftables job first, then what only
# the iptables job and the dry run add.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "error: needs root (runs the binary in fresh network namespaces)" >&2; exit 1; }
for tool in gdb unshare python3; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found" >&2; exit 1; }
done
triple=${TARGET:-$(rustc -vV | sed -n 's/^host: //p')}
export CARGO_TARGET_DIR="$PWD/target/hot"
map="$CARGO_TARGET_DIR/link.map"
mkdir -p "$CARGO_TARGET_DIR"
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C link-arg=-Wl,-Map=$map,--no-demangle" \
  cargo build --release --locked --target "$triple" --bin istio-init
bin="$CARGO_TARGET_DIR/$triple/release/istio-init"
out=link/hot-symbols.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The standard sidecar arguments; the nftables job is the one the layout is tuned for.
args=(istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*'
  -d 15090,15021,15020 --log_output_level=default:info)
jobs=(nftables iptables dry-run)
job_args() {
  case $1 in
    nftables) echo --native-nftables ;;
    iptables) ;;
    dry-run) echo --dry-run ;;
  esac
}

# The linker map's .text input sections, for both scripts below (on their PYTHONPATH).
cat >"$work/linkmap.py" <<'EOF'
import re
LINE = re.compile(r"^\s*([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+\d+ (\s*)(\S.*)$")
def text_sections(path):
    """{section address: (size, [(symbol address, name), ...])} of .text, in map order."""
    sections, out, cur = {}, None, None
    for l in open(path):
        m = LINE.match(l)
        if not m:
            continue
        addr, size, depth = int(m[1], 16), int(m[2], 16), len(m[3])
        if depth == 0:
            out = m[4]
        elif out == ".text" and depth == 8:
            cur = sections.setdefault(addr, (size, []))
        elif out == ".text" and depth == 16 and cur is not None:
            cur[1].append((addr, m[4]))
    return sections
EOF

# Inside gdb: one-shot breakpoints at every .text section and symbol start, run to the end,
# write the executed sections' map addresses in first-hit order.
cat >"$work/trace.py" <<'EOF'
import gdb, os
from linkmap import text_sections
MAP, OUT, BIN = os.environ["HOT_MAP"], os.environ["HOT_OUT"], os.path.realpath(os.environ["HOT_BIN"])
section_of = {}
for section, (size, symbols) in text_sections(MAP).items():
    if size:
        for addr in [section] + [a for a, _ in symbols]:
            section_of.setdefault(addr, section)
gdb.execute("set pagination off")
gdb.execute("set confirm off")
gdb.execute("set breakpoint always-inserted on")
gdb.execute("starti", to_string=True)
pid = gdb.selected_inferior().pid
base = next(int(f[0].split("-")[0], 16) for f in (l.split() for l in open(f"/proc/{pid}/maps"))
            if len(f) >= 6 and int(f[2], 16) == 0 and os.path.realpath(f[5]) == BIN)
order = []
def hit(pc):
    s = section_of.get(pc - base)
    if s is None:
        raise gdb.GdbError(f"stopped at {pc - base:#x}, not a traced entry")
    if s not in order:
        order.append(s)
hit(int(gdb.parse_and_eval("$pc")))  # the entry point, where starti stopped
points = [gdb.Breakpoint(f"*{base + a:#x}", internal=True, temporary=True) for a in section_of]
# The iptables job ends by exec'ing the restore (the handover): tracing stops at the execve.
gdb.execute("catch syscall execve", to_string=True)
execve = gdb.breakpoints()[-1]
while True:
    gdb.execute("continue", to_string=True)
    if not gdb.selected_inferior().pid:
        break
    if execve.hit_count:
        for b in points + [execve]:
            if b.is_valid():
                b.delete()
        gdb.execute("continue", to_string=True)
        break
    hit(int(gdb.parse_and_eval("$pc")))
code = gdb.parse_and_eval("$_exitcode")
if int(code) != 0:
    raise gdb.GdbError(f"the traced run exited with {int(code)}")
with open(OUT, "w") as f:
    f.writelines(f"{s:x}\n" for s in order)
EOF

for job in "${jobs[@]}"; do
  # shellcheck disable=SC2046 # job_args prints zero or one word
  if ! PYTHONPATH="$work" HOT_MAP="$map" HOT_OUT="$work/$job.hits" HOT_BIN="$bin" unshare -n \
      gdb -nx -batch -x "$work/trace.py" --args "$bin" "${args[@]}" $(job_args "$job") \
      >"$work/$job.log" 2>&1 || [ ! -s "$work/$job.hits" ]; then
    echo "error: tracing the $job job failed:" >&2; tail -n 20 "$work/$job.log" >&2; exit 1
  fi
  echo "$job: $(wc -l <"$work/$job.hits") sections executed"
done

# Sections (by map address) → symbol names. A section is named by its first symbol whose name
# is unique in .text (lld moves every section defining a listed name, so a name shared by
# several local functions would drag cold ones along); all of its names if none is unique.
PYTHONPATH="$work" python3 - "$map" "$out" "$(rustc -V)" "${jobs[@]/#/$work/}" <<'EOF'
import sys
from collections import Counter
from linkmap import text_sections
map_path, out_path, rustc, hits = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
sections = {a: (size, [n for _, n in syms]) for a, (size, syms) in text_sections(map_path).items()}
count = Counter(n for _, names in sections.values() for n in names)
order, seen = [], set()
for path in hits:
    for l in open(path + ".hits"):
        s = int(l, 16)
        if s not in seen:
            seen.add(s)
            order.append(s)
names, size = [], 0
for s in order:
    sec_size, syms = sections[s]
    size += sec_size
    unique = [n for n in syms if count[n] == 1]
    names += unique[:1] or syms
with open(out_path, "w") as f:
    f.write(
        "# Symbol ordering file for lld (--symbol-ordering-file; lines starting with # are\n"
        "# comments): the functions the standard sidecar run executes, in first-execution order\n"
        "# (nftables mode, then what the iptables mode and the dry run add). build.rs passes it to\n"
        "# static Linux builds. Generated by scripts/hot-symbols.sh (as root); do not edit.\n"
        f"# {len(order)} sections, {size} bytes of code; {rustc}.\n")
    f.writelines(n + "\n" for n in names)
print(f"{out_path}: {len(names)} symbols, {len(order)} sections, {size} bytes")
EOF
