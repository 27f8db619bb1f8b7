#!/usr/bin/env python3
# Usage (root): python3 benches/against-istio.py ISTIO_INIT ISTIO_IPTABLES ROUNDS
#   e.g. python3 benches/against-istio.py target/x86_64-unknown-linux-gnu/release/istio-init ../shared/reference/istio-iptables 100
# Interleaved: istio-init vs Istio's istio-iptables, the injector's default args, each run in a
# fresh pod-like namespace (lo up, a veth with 198.18.0.1/24) made before the clock starts;
# timed: `nsenter --net=NS BIN ARGS` (the floor: nsenter of /bin/true). CPU incl. children.
import subprocess, resource, time, sys, statistics, os
ours, istio = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3])
args = ["istio-iptables","-p","15001","-z","15006","-u","1337","-m","REDIRECT","-i","*","-x","","-b","*","-d","15090,15021,15020","--log_output_level=default:info"]
env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
def cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN); return r.ru_utime + r.ru_stime
n = 0
def fresh():
    global n; n += 1; name = f"iibench{os.getpid()}-{n}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "-batch", "-"], input=b"link set lo up\nlink add eth0 type veth peer name eth1\naddr add 198.18.0.1/24 dev eth0\nlink set eth0 up\nlink set eth1 up\n", check=True)
    return name
def run(cmd):
    ns = fresh()
    try:
        c0, t0 = cpu(), time.perf_counter()
        p = subprocess.run(["nsenter", f"--net=/var/run/netns/{ns}"] + cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        w, c = time.perf_counter() - t0, cpu() - c0
        assert p.returncode == 0, (cmd, p.stderr[-2000:])
        return w * 1000, c * 1000
    finally:
        subprocess.run(["ip", "netns", "del", ns])
for mode, extra in (("iptables mode", []), ("nftables mode", ["--native-nftables"])):
    cmds = {"floor (nsenter /bin/true)": ["/bin/true"], "istio-init": [ours] + args + extra, "Istio's istio-iptables": [istio] + args + extra}
    res = {k: ([], []) for k in cmds}
    keys = list(cmds)
    for i in range(rounds + 3):
        for k in keys[i % 3:] + keys[:i % 3]:
            w, c = run(cmds[k])
            if i >= 3: res[k][0].append(w); res[k][1].append(c)
    med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in res.items()}
    f = med["floor (nsenter /bin/true)"]
    for k, (w, c) in med.items():
        print(f"{mode}: {k}: median wall {w:.2f} ms, CPU {c:.2f} ms")
    o, i_ = med["istio-init"], med["Istio's istio-iptables"]
    print(f"{mode}: Istio / istio-init: wall {i_[0]/o[0]:.1f}x, CPU {i_[1]/o[1]:.1f}x; above the floor: wall {(i_[0]-f[0])/(o[0]-f[0]):.1f}x, CPU {(i_[1]-f[1])/(o[1]-f[1]):.1f}x")
