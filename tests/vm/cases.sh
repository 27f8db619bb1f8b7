#!/bin/sh
# The kernel cases of the microVM test (scripts/vm-test.sh), run the same way inside the VM
# (busybox sh, as /init's child) and on the host: every case makes its own network namespaces,
# applies with the real istio-init, and prints the kernel state it leaves between markers:
#
#   @@case NAME          the state of one case, normalised (saves without counters and
#   ...                  comments, `nft list ruleset` with counters zeroed, TPROXY routing,
#   @@end NAME           the answers of real connections without ephemeral ports)
#   @@fail NAME: WHY     an assertion of the case failed (the runner goes on)
#   @@done cases=N failures=F
#
# scripts/vm-test.sh compares each case's block with the host's. Cases named `vmonly-*` run
# only in the VM (they hide kernel modules). Written for POSIX sh: busybox ash runs it in the VM.
#
# Environment: II (istio-init), HELPER (tests/pod-helper, static), IPR (iproute2's `ip`: in
# busybox sh a bare `ip` is busybox's), SETPRIV (util-linux setpriv), DATA (the case
# directories scripts/vm-test.sh prepares: ipt/CASE and nft/CASE, each with `argv`, `env` and
# `resolv.conf`), WHERE (vm or host), ONLY (optional: a grep -E pattern of cases to run).
set -u

: "${II:?}" "${HELPER:?}" "${IPR:?}" "${SETPRIV:?}" "${DATA:?}" "${WHERE:?}"
ONLY=${ONLY:-.}
TAG="vm$$"
SEQ=0
CASES=0
FAILURES=0
CASE=
WORK=$(mktemp -d)
# Group names the owner-group cases use, resolvable in every namespace.
GROUPS_FILE="root:x:0:
java:x:1001:
ftp:x:1002:"

# On exit: the host's namespaces of this run are deleted (the VM is thrown away).
cleanup() {
  if [ "$WHERE" = host ]; then
    for ns in $("$IPR" netns list 2>/dev/null | sed -n "s/^\($TAG-[0-9]*\).*/\1/p"); do
      del_ns "$ns" 2>/dev/null
    done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
  echo "@@fail $CASE: $*"
  FAILURES=$((FAILURES + 1))
}

# ---- Namespaces ----

# Creates a namespace with its loopback up and sets NS to its name. In the VM with busybox
# applets (static: far cheaper than iproute2 under TCG); on the host with `ip netns`, plus
# the groups file `ip netns exec` shows as /etc/group.
new_ns() {
  SEQ=$((SEQ + 1))
  NS="$TAG-$SEQ"
  if [ "$WHERE" = vm ]; then
    : >"/run/netns/$NS"
    /bin/busybox unshare --net="/run/netns/$NS" /bin/busybox ip link set lo up ||
      { echo "creating namespace $NS failed" >&2; exit 1; }
    return
  fi
  "$IPR" netns add "$NS" || { echo "ip netns add $NS failed" >&2; exit 1; }
  "$IPR" -n "$NS" link set lo up
  mkdir -p "/etc/netns/$NS"
  printf '%s\n' "$GROUPS_FILE" >"/etc/netns/$NS/group"
}

del_ns() {
  "$IPR" netns del "$1"
  rm -rf "/etc/netns/$1"
}

# Runs a command in a namespace. In the VM, nsenter (a busybox applet: cheaper under TCG than
# `ip netns exec`, and /etc/group there already has the groups); on the host, `ip netns exec`
# (which shows /etc/netns/NS/group as /etc/group).
nx() {
  local where=$1
  shift
  if [ "$WHERE" = vm ]; then
    nsenter --net="/run/netns/$where" "$@"
  else
    "$IPR" netns exec "$where" "$@"
  fi
}

# A pod and its peer: a veth between them, 198.18.0.1/24 + 2001:db8::1/64 in the pod,
# 198.18.0.2 + 2001:db8::2 in the peer. Sets POD and PEER.
pod_and_peer() {
  new_ns
  POD=$NS
  new_ns
  PEER=$NS
  "$IPR" link add v0 netns "$POD" type veth peer name v1 netns "$PEER"
  for end in "$POD v0 1" "$PEER v1 2"; do
    # shellcheck disable=SC2086 # three words
    set -- $end
    "$IPR" -n "$1" addr add "198.18.0.$3/24" dev "$2"
    "$IPR" -n "$1" addr add "2001:db8::$3/64" dev "$2" nodad
    "$IPR" -n "$1" link set "$2" up
  done
}

# ---- Running istio-init ----

# run_ii NS CASEDIR [EXTRA...]: istio-init in NS with the case's arguments, then EXTRA, with a
# clean environment (PATH, the case's env file, and VAR=value words of II_ENV). Sets RC and
# ERR (its last `error:` line); its stderr is in $WORK/stderr.
run_ii() {
  local ns=$1 dir=$2 extra arg
  shift 2
  extra=$#
  while IFS= read -r arg; do set -- "$@" "$arg"; done <"$dir/argv"
  while [ "$extra" -gt 0 ]; do
    set -- "$@" "$1"
    shift
    extra=$((extra - 1))
  done
  # shellcheck disable=SC2046,SC2086 # one VAR=value per word
  nx "$ns" env -i "PATH=${II_PATH:-$PATH}" $(cat "$dir/env") ${II_ENV:-} "$II" "$@" \
    --resolv-conf="$dir/resolv.conf" >/dev/null 2>"$WORK/stderr"
  RC=$?
  ERR=$(grep '^error: ' "$WORK/stderr" | tail -n 1)
}

# Runs istio-init and fails the case unless it exits 0.
apply_ok() {
  run_ii "$@"
  [ "$RC" = 0 ] || fail "istio-init $* exited $RC: $(tail -n 3 "$WORK/stderr")"
}

# ---- Kernel state ----

save() {
  nx "$1" "$2" | grep -v '^#' | sed 's/ \[[0-9]*:[0-9]*\]$//'
}

# The saves of one backend: IPv6 only when FAMILIES says so (a case without IPv6 has no
# IPv6 rules; one program less under TCG).
ipt_state() {
  for fam in ${FAMILIES:-iptables ip6tables}; do
    echo "## $fam-$2-save"
    save "$1" "$fam-$2-save"
  done
}

nft_state() {
  echo "## nft list ruleset"
  # `# progname` is what nft finds of an owner's process name, not kernel state.
  nx "$1" nft list ruleset |
    sed 's/counter packets [0-9]* bytes [0-9]*/counter packets 0 bytes 0/; s/ # progname .*//'
}

# The TPROXY routing a run adds: policy rules, table 133, `::6` on lo.
routing() {
  echo "## routing"
  "$IPR" -n "$1" -4 rule show
  "$IPR" -n "$1" -6 rule show
  # A fresh namespace has no table 133 (the error says so on stderr).
  "$IPR" -n "$1" -4 route show table 133 2>/dev/null
  "$IPR" -n "$1" -6 route show table 133 2>/dev/null
  "$IPR" -n "$1" -6 addr show dev lo | grep inet6
}

# state NS MODE: MODE is ipt-nft, ipt-legacy or nft. The routing unless NO_ROUTING is set
# (only TPROXY adds any).
state() {
  case $2 in
    ipt-*) ipt_state "$1" "${2#ipt-}" ;;
    nft) nft_state "$1" ;;
  esac
  [ -n "${NO_ROUTING:-}" ] || routing "$1"
}

# Sets FAMILIES and NO_ROUTING for a case directory's configuration.
scope() {
  FAMILIES="iptables ip6tables"
  grep -qx -- --ipv6=true "$1/argv" || FAMILIES=iptables
  NO_ROUTING=
  grep -qx TPROXY "$1/argv" || NO_ROUTING=1
}

# Every backend and nftables: any Istio chain, rule or table left.
istio_left() {
  for p in iptables-nft-save ip6tables-nft-save iptables-legacy-save ip6tables-legacy-save; do
    save "$1" "$p" | grep -i istio
  done
  nx "$1" nft list ruleset | grep -i istio
}

begin() {
  CASE=$1
  CASES=$((CASES + 1))
  STARTED=$(date +%s)
  echo "@@case $CASE"
}

# Ends a case. On the host its namespaces are deleted; the VM keeps them (it is thrown
# away, and deleting costs time under TCG).
finish() {
  echo "@@end $CASE"
  echo "@@took $CASE $(($(date +%s) - STARTED)) s"
  [ "$WHERE" = vm ] && return
  for ns in $("$IPR" netns list 2>/dev/null | sed -n "s/^\($TAG-[0-9]*\).*/\1/p"); do
    del_ns "$ns"
  done
}

wanted() {
  echo "$1" | grep -Eq "$ONLY"
}

# ---- Cases ----

# After `--cleanup-only`: fails the case if any Istio rule, chain or table is left (in either
# backend or nftables), and prints the state. The TPROXY routing stays, by design
# (docs/design.md).
cleaned() {
  local left
  left=$(istio_left "$1")
  [ -z "$left" ] || fail "--cleanup-only left: $left"
  echo "## after --cleanup-only"
  state "$1" "$2"
}

# The conformance cases of one mode (ipt-nft, ipt-legacy: tests/golden, Istio's 27; nft:
# nft-cases.json, Istio's 28 nftables goldens): each applied in a fresh namespace, its state
# printed. (Re-runs and --cleanup-only: rerun_cleanup.)
conformance() {
  local mode=$1 set=ipt dir
  [ "$mode" = nft ] && set=nft
  for dir in "$DATA/$set"/*/; do
    dir=${dir%/}
    wanted "$mode-${dir##*/}" || continue
    begin "$mode-${dir##*/}"
    new_ns
    scope "$dir"
    II_ENV=
    [ "$set" = ipt ] && II_ENV="FORCE_IPTABLES_BINARY=${mode#ipt-}"
    apply_ok "$NS" "$dir"
    state "$NS" "$mode"
    finish
  done
  FAMILIES=
  NO_ROUTING=
  II_ENV=
}

# Waits until a pod-helper server's output says it listens (at most 30 s).
wait_for() {
  local i=0
  until grep -qs listening "$1"; do
    i=$((i + 1))
    [ "$i" -lt 300 ] || { fail "pod-helper did not start: $(cat "$1")"; return; }
    sleep 0.1
  done
}

# Starts a command in NS in the background, as its own process (nsenter and `ip netns exec`
# exec it), and adds its pid to SERVERS.
in_background() {
  local ns=$1
  shift
  if [ "$WHERE" = vm ]; then
    nsenter --net="/run/netns/$ns" "$@" &
  else
    "$IPR" netns exec "$ns" "$@" &
  fi
  SERVERS="$SERVERS $!"
}

# Starts a pod-helper server in NS (as uid/gid 1337 when WHO is proxy), waits until it
# listens.
serve() {
  local who=$1 ns=$2 out
  shift 2
  out="$WORK/serve.$ns.$2"
  if [ "$who" = proxy ]; then
    set -- "$SETPRIV" --reuid=1337 --regid=1337 --clear-groups "$HELPER" "$@"
  else
    set -- "$HELPER" "$@"
  fi
  in_background "$ns" "$@" >"$out" 2>&1
  wait_for "$out"
}

# expect WHO NS WANT HELPER-ARGS...: runs `pod-helper` in NS (as uid/gid 1337 when WHO is
# proxy), prints its answers without the client's ephemeral port, and fails unless every
# answer contains WANT.
expect() {
  local who=$1 ns=$2 want=$3 got
  shift 3
  if [ "$who" = proxy ]; then
    got=$(nx "$ns" "$SETPRIV" --reuid=1337 --regid=1337 --clear-groups "$HELPER" "$@")
  else
    got=$(nx "$ns" "$HELPER" "$@")
  fi
  got=$(echo "$got" | sed 's/ from=[^ )]*//')
  echo "$who: $got"
  case $got in
    *"$want"*) ;;
    *) fail "$who $*: want an answer with '$want', got: $got" ;;
  esac
}

# The mode's arguments for a configuration written as a case directory.
traffic_dir() {
  local dir="$WORK/traffic-$1-$2"
  mkdir -p "$dir"
  {
    printf '%s\n' istio-iptables -p 15001 -z 15006 -u 1337 -g 1337 -m "$2" -i '*' -b '*'
    printf '%s\n' -d 15090,15021,15020 --redirect-dns --ipv6=true
    [ "$1" = nft ] && echo --native-nftables
  } >"$dir/argv"
  case $1 in
    ipt-*) echo "FORCE_IPTABLES_BINARY=${1#ipt-}" >"$dir/env" ;;
    *) : >"$dir/env" ;;
  esac
  echo "nameserver 198.18.0.2" >"$dir/resolv.conf"
  echo "$dir"
}

# Real connections through the rules of one mode: outbound and inbound capture (REDIRECT or
# TPROXY), the proxy's own traffic bypassing, DNS over UDP and TCP to the agent's port.
traffic() {
  local mode=$1 inbound=$2 dir transparent local4 local6
  wanted "traffic-$mode-$inbound" || return 0
  begin "traffic-$mode-$inbound"
  pod_and_peer
  dir=$(traffic_dir "$mode" "$inbound")
  apply_ok "$POD" "$dir"
  transparent=
  [ "$inbound" = TPROXY ] && transparent=--transparent
  SERVERS=
  # shellcheck disable=SC2086 # no word when empty
  serve root "$POD" serve proxy 15001,15006,15053 $transparent
  # The DNS agent runs as the proxy's user: its answers go back through conntrack zone 2.
  serve proxy "$POD" udp-serve agent 15053
  serve root "$PEER" serve peer 80,8080
  # The app's outbound connections land on 15001 with their original destination.
  expect app "$POD" "proxy port=15001 orig=198.18.0.2:80" connect 198.18.0.2:80
  expect app "$POD" "proxy port=15001 orig=[2001:db8::2]:80" connect "[2001:db8::2]:80"
  # The proxy's own connections go out untouched.
  expect proxy "$POD" "peer port=80 orig=198.18.0.2:80" connect 198.18.0.2:80
  # Inbound: on 15006, the original destination kept (TPROXY: as the local address too).
  local4="local=198.18.0.1:15006"
  local6="local=[2001:db8::1]:15006"
  if [ "$inbound" = TPROXY ]; then
    local4="local=198.18.0.1:8080"
    local6="local=[2001:db8::1]:8080"
  fi
  expect peer "$PEER" "proxy port=15006 orig=198.18.0.1:8080 $local4" connect 198.18.0.1:8080
  expect peer "$PEER" "proxy port=15006 orig=[2001:db8::1]:8080 $local6" connect "[2001:db8::1]:8080"
  # DNS to the nameserver: UDP and TCP to the agent's 15053; the answer seems to come from :53.
  expect app "$POD" "agent port=15053 (from 198.18.0.2:53)" udp-send 198.18.0.2:53
  expect app "$POD" "proxy port=15053 orig=198.18.0.2:53" connect 198.18.0.2:53
  # shellcheck disable=SC2086 # a list of pids
  kill $SERVERS 2>/dev/null
  wait 2>/dev/null
  finish
}

# A dual-stack TPROXY + DNS + INVALID-drop configuration (nat, mangle and raw tables).
sidecar_dir() {
  local dir="$WORK/sidecar-$1"
  mkdir -p "$dir"
  printf '%s\n' -m TPROXY --redirect-dns --drop-invalid --ipv6=true >"$dir/argv"
  [ "$1" = nft ] && echo --native-nftables >>"$dir/argv"
  case $1 in
    ipt-*) echo "FORCE_IPTABLES_BINARY=${1#ipt-}" >"$dir/env" ;;
    *) : >"$dir/env" ;;
  esac
  printf 'nameserver 198.18.0.53\nnameserver 2001:db8::53\n' >"$dir/resolv.conf"
  echo "$dir"
}

# A run the kernel refuses (nftables mode: another process owns `inet istio-proxy-raw` with
# `flags owner`, so the transaction's delete of it is refused) leaves every table as it was.
refused_nft() {
  local dir i before after
  wanted refused-nft || return 0
  begin refused-nft
  pod_and_peer
  dir=$(sidecar_dir nft)
  apply_ok "$POD" "$dir"
  nx "$POD" nft delete table inet istio-proxy-raw
  mkfifo "$WORK/owner"
  SERVERS=
  # The FIFO is opened by the background process (opening it here would wait for a writer).
  in_background "$POD" sh -c 'exec nft -i <"$1" >/dev/null 2>&1' sh "$WORK/owner"
  exec 3>"$WORK/owner"
  echo 'add table inet istio-proxy-raw { flags owner; }' >&3
  i=0
  until nx "$POD" nft list ruleset | grep -q 'flags owner'; do
    i=$((i + 1))
    [ "$i" -lt 300 ] || { fail "nft -i made no owned table"; break; }
    sleep 0.1
  done
  before=$(state "$POD" nft)
  run_ii "$POD" "$dir" --envoy-port=15009
  echo "exit $RC"
  echo "$ERR"
  [ "$RC" = 1 ] || fail "a refused run exited $RC"
  case $ERR in
    *"the kernel refused \`add table inet istio-proxy-raw; delete table inet istio-proxy-raw\`"*"nothing was applied") ;;
    *) fail "unexpected error: $ERR" ;;
  esac
  after=$(state "$POD" nft)
  echo "$after"
  [ "$after" = "$before" ] || fail "the refused run changed the namespace"
  exec 3>&-
  # shellcheck disable=SC2086 # one pid
  wait $SERVERS
  finish
}

# A re-run of the dual-stack TPROXY + DNS configuration changes nothing, and --cleanup-only
# leaves nothing of it.
rerun_cleanup() {
  local mode=$1 dir first
  wanted "rerun-cleanup-$mode" || return 0
  begin "rerun-cleanup-$mode"
  pod_and_peer
  dir=$(sidecar_dir "$mode")
  apply_ok "$POD" "$dir"
  first=$(state "$POD" "$mode")
  echo "$first"
  apply_ok "$POD" "$dir"
  [ "$(state "$POD" "$mode")" = "$first" ] || fail "a re-run changed the state: $(state "$POD" "$mode")"
  apply_ok "$POD" "$dir" --cleanup-only
  cleaned "$POD" "$mode"
  finish
}

# A state without what decides nothing: table headers, COMMIT and built-in chains (nf_tables
# keeps an emptied table's built-in chains; the project's tests compare the same way).
rules_view() {
  grep -v -e '^\*' -e '^COMMIT$' -e '^:[A-Z]* [A-Z]*$'
}

# Rules of another component (in nat and mangle, both families) that a run must not disturb.
foreign_rules() {
  local fam
  for fam in iptables ip6tables; do
    printf '%s\n' '*nat' ':FOREIGN - [0:0]' '-A OUTPUT -p tcp --dport 9 -j FOREIGN' \
      '-A FOREIGN -j RETURN' COMMIT '*mangle' ':FOREIGN - [0:0]' \
      '-A PREROUTING -p udp --dport 9 -j FOREIGN' '-A FOREIGN -j ACCEPT' COMMIT |
      nx "$1" "$fam-$2-restore" --noflush
  done
}

# iptables mode: in a namespace with another component's rules, the IPv6 restore refuses its
# input (a shim turns a port into 99999) after IPv4 committed; the IPv4 tables and the TPROXY
# routes this run added are rolled back: every table is as it was.
refused_ipt() {
  local backend=$1 dir shim real before after
  wanted "refused-ipt-$backend" || return 0
  begin "refused-ipt-$backend"
  pod_and_peer
  foreign_rules "$POD" "$backend"
  dir=$(sidecar_dir "ipt-$backend")
  shim="$WORK/shim-$backend"
  mkdir -p "$shim"
  real=$(command -v "ip6tables-$backend-restore")
  printf '#!/bin/sh\nsed "s/--to-ports 15001/--to-ports 99999/" | %s "$@"\n' "$real" \
    >"$shim/ip6tables-$backend-restore"
  chmod +x "$shim/ip6tables-$backend-restore"
  before=$(state "$POD" "ipt-$backend" | rules_view)
  II_PATH="$shim:$PATH" run_ii "$POD" "$dir"
  echo "exit $RC"
  echo "$ERR" | sed "s|$shim/||"
  [ "$RC" = 1 ] || fail "a refused run exited $RC"
  case $ERR in
    *"rolled back"*"Port \`99999' not valid"*) ;;
    *) fail "unexpected error: $ERR" ;;
  esac
  state "$POD" "ipt-$backend"
  after=$(state "$POD" "ipt-$backend" | rules_view)
  [ "$after" = "$before" ] || fail "the refused run changed the namespace: $after"
  finish
}

# refused_feature NS MODE DIR FEATURE [EXTRA...]: a run the kernel refuses for want of a
# feature: exit 1, the error names FEATURE, and the namespace is as it was (a fresh one: no
# Istio rule left; legacy tables, once used, stay).
refused_feature() {
  local ns=$1 mode=$2 dir=$3 feature=$4 label="$2${5:+ $5}" before left
  shift 4
  before=$(state "$ns" "$mode")
  case $before in
    *ISTIO* | *istio*) ;;
    *) before= ;;
  esac
  run_ii "$ns" "$dir" "$@"
  echo "$label: exit $RC"
  echo "$label: $ERR"
  [ "$RC" = 1 ] || fail "$label: a run without $feature exited $RC"
  case $ERR in
    *"$feature"*) ;;
    *) fail "$label: the error does not name $feature: $ERR" ;;
  esac
  if [ -n "$before" ]; then
    [ "$(state "$ns" "$mode")" = "$before" ] || fail "$label: the refused run changed the namespace"
  else
    left=$(istio_left "$ns")
    [ -z "$left" ] || fail "$label: a refused run left: $left"
  fi
}

# VM only, first (before anything loads ip_tables): legacy iptables where the ip_tables
# module is not loaded. The kernel does not autoload it and the container cannot load it
# (no CAP_SYS_MODULE), so the error must name it. Then it is loaded, as a node using legacy
# iptables has it.
vmonly_legacy_without_ip_tables() {
  [ "$WHERE" = vm ] || return 0
  wanted vmonly-legacy-without-ip-tables || return 0
  begin vmonly-legacy-without-ip-tables
  new_ns
  refused_feature "$NS" ipt-legacy "$(sidecar_dir ipt-legacy)" \
    "the kernel module x_tables is not loaded and the container cannot load it"
  finish
}

# VM only, before anything loads TPROXY: a kernel without it (nft_tproxy and xt_TPROXY hidden
# from modprobe). In each mode a TPROXY run is refused naming the missing feature and leaves
# the namespace as it was: in a fresh namespace, and with --reconcile over a REDIRECT pod.
vmonly_missing_tproxy() {
  local hidden m mode tproxy redirect feature
  [ "$WHERE" = vm ] || return 0
  wanted vmonly-missing-tproxy || return 0
  begin vmonly-missing-tproxy
  hidden=$(find /lib/modules -name 'nft_tproxy.ko*' -o -name 'xt_TPROXY.ko*')
  [ -n "$hidden" ] || fail "no TPROXY module to hide"
  for m in $hidden; do mv "$m" "$m.hidden"; done
  for mode in nft ipt-nft ipt-legacy; do
    case $mode in
      nft) feature=CONFIG_NFT_TPROXY ;;
      *) feature=xt_TPROXY ;;
    esac
    tproxy=$(sidecar_dir "$mode")
    new_ns
    refused_feature "$NS" "$mode" "$tproxy" "$feature"
    redirect="$WORK/redirect-$mode"
    mkdir -p "$redirect"
    grep -v -e TPROXY -e '^-m$' "$tproxy/argv" >"$redirect/argv"
    cp "$tproxy/env" "$tproxy/resolv.conf" "$redirect/"
    new_ns
    apply_ok "$NS" "$redirect"
    refused_feature "$NS" "$mode" "$tproxy" "$feature" --reconcile
  done
  for m in $hidden; do mv "$m.hidden" "$m"; done
  finish
}

vmonly_legacy_without_ip_tables
# A node using legacy iptables has these loaded (the container cannot load them).
[ "$WHERE" = vm ] && modprobe -a x_tables ip_tables ip6_tables
vmonly_missing_tproxy
for mode in ipt-nft ipt-legacy nft; do
  conformance "$mode"
  traffic "$mode" REDIRECT
  traffic "$mode" TPROXY
  rerun_cleanup "$mode"
done
refused_nft
for backend in nft legacy; do refused_ipt "$backend"; done
echo "@@done cases=$CASES failures=$FAILURES"
[ "$FAILURES" = 0 ]
