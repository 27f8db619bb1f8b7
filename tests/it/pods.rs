//! The injector's real pods, run by a pod engine: every manifest of
//! `../shared/conformance/injected-pods/` (exactly as Istio's sidecar injector renders them) is
//! turned into a runnable Pod and started with `podman kube play`, which runs the init
//! containers one after the other before the app containers, all in one network namespace, with
//! the manifest's security contexts. Then real traffic goes through the pod:
//!
//! - the `istio-init` (or `istio-validation`) container is our image with its args, env and
//!   securityContext untouched; it exits 0 before any other container starts;
//! - outbound from the app lands on the test proxy's outbound port with the right
//!   `SO_ORIGINAL_DST`, unless the args (rendered from the annotations) exclude it; the proxy's
//!   own traffic (its uid) bypasses;
//! - inbound from a peer namespace lands on the inbound capture port (REDIRECT or TPROXY), or on
//!   the app/proxy directly for excluded or not-included ports;
//! - Istio CNI mode: the test plays the CNI plugin (programs the rules with the host binary before
//!   the containers start); `istio-validation` (uid 1337, no capabilities) exits 0 with them and
//!   126 without them, and then no app container starts;
//! - the debug-pod flow of docs/kubernetes.md: a container joined to the pod's network namespace
//!   with NET_ADMIN + NET_RAW runs `istio-init explain`, `trace` (one per connection made) and a
//!   dry run; they agree with where the traffic landed and with the rules in the kernel.
//!
//! Expectations come from the init container's arguments, never from the rules themselves.
//! `scripts/pod-e2e.sh POD.yaml` runs this test for one manifest of the user's
//! (`POD_E2E_MANIFEST`), with its log.
//!
//! What the rewrite changes, and why (nothing else is touched):
//! - images: ours for istio-init/istio-validation (`imagePullPolicy: Never`), the static
//!   `tests/pod-helper` for the proxy (runs as the `-u`/`-g` of the init args, listens on the
//!   proxy ports, with `IP_TRANSPARENT` and NET_ADMIN for TPROXY) and the app containers (the
//!   default container serves its ports; the others only stay up);
//! - podman 4.3 has no native sidecars: an init container with `restartPolicy: Always`
//!   (`istio-proxy`, other sidecars) would block the pod, so it becomes a regular container;
//! - a first init container, `network`, stands in for the kubelet's network setup (CNI ADD):
//!   podman 4.3 cannot put a pod in a namespace of ours (`--network ns:` is refused for pods), so
//!   the pod gets `--network none` and the test moves a veth into it, addresses it from
//!   198.18.0.0/24 and 2001:db8::/64 and (CNI mode) programs the rules while `network` waits for
//!   the IPv4 address, which comes last; `podman` holds the pod's lock during init, so the test
//!   finds that container by its process, not with `podman inspect`;
//! - volumes, probes, env of the proxy and app containers are dropped (nothing serves them);
//! - podman 4.3 quirks, documented rather than fought: its default rlimits are refused here
//!   (`default_ulimits` in a containers.conf passed with `CONTAINERS_CONF`); annotation values
//!   longer than 63 characters are rejected (the injector's `sidecar.istio.io/status`,
//!   `proxy.istio.io/config` and `proxy.istio.io/overrides` are dropped: istio-init does not read
//!   them, their effect is already in the args); it can race removing a finished once-only init
//!   container (`io.podman.annotations.init.container.type: always` keeps it, so its exit code
//!   can be read); and it restarts even init containers under the default `restartPolicy:
//!   Always`, so the pod gets `restartPolicy: Never`.
//!
//! Needs what tests/it/image.rs needs (root, buildah, podman, runc; missing tools fail under
//! `CI=true`) and builds on its image.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use yaml_rust2::{Yaml, YamlLoader};

use crate::image::{self, Image};
use crate::util::{self, Netns, output, stderr, stdout};

/// Extra istio-init arguments every pod is also run with, one pod run per entry (appended to the
/// init container's args). Add `&["--native-nftables"]` here once that backend exists (today it
/// exits 2).
const ARG_VARIANTS: &[&[&str]] = &[&[], &["--native-nftables"]];

const POD_V4: &str = "198.18.0.1";
const PEER_V4: &str = "198.18.0.2";
const POD_V6: &str = "2001:db8::1";
const PEER_V6: &str = "2001:db8::2";
/// A port the peer serves that no manifest names.
const PEER_PORT: u16 = 8080;
const INIT_IMAGE: &str = "localhost/istio-init:pod-e2e";
const HELPER_IMAGE: &str = "localhost/pod-helper:pod-e2e";
const HELPER: &str = "/pod-helper";
/// The sidecar's own ports besides the capture ports (Envoy admin/Prometheus, readiness, agent).
const PROXY_SIDE_PORTS: [u16; 3] = [15020, 15021, 15090];

/// The static helper on the host (the peer runs it) and in its image; built once per process.
fn helper(img: &Image) -> Result<PathBuf, String> {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let host = stdout(&output(Command::new("rustc").arg("-vV")));
    let triple = host
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .ok_or("rustc -vV names no host")?
        .to_owned();
    // The image build's target dir: nix is already built there with the same flags.
    let target = tmp.join("image-cargo");
    let o = output(
        Command::new("cargo")
            .args(["build", "--release", "--locked", "--target", &triple])
            .arg("--manifest-path")
            .arg(repo.join("tests/pod-helper/Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    );
    if !o.status.success() {
        return Err(format!("building tests/pod-helper: {}", stderr(&o)));
    }
    let bin = target.join(&triple).join("release/pod-helper");
    let ctx = tmp.join("pod-helper-image");
    std::fs::create_dir_all(&ctx).map_err(|e| e.to_string())?;
    std::fs::copy(&bin, ctx.join("pod-helper")).map_err(|e| e.to_string())?;
    std::fs::write(
        ctx.join("Containerfile"),
        format!("FROM scratch\nCOPY pod-helper {HELPER}\nENTRYPOINT [\"{HELPER}\"]\n"),
    )
    .map_err(|e| e.to_string())?;
    let o = output(
        podman(img)
            .args([
                "build",
                "--quiet",
                "--isolation",
                "chroot",
                "-t",
                HELPER_IMAGE,
            ])
            .arg(&ctx),
    );
    if !o.status.success() {
        return Err(format!("podman build {HELPER_IMAGE}: {}", stderr(&o)));
    }
    let o = output(podman(img).args(["tag", &img.id, INIT_IMAGE]));
    if !o.status.success() {
        return Err(format!("podman tag {INIT_IMAGE}: {}", stderr(&o)));
    }
    let _ = output(podman(img).args(["image", "prune", "--force"]));
    Ok(bin)
}

/// `podman` on the image tests' private store, with this test's containers.conf.
fn podman(img: &Image) -> Command {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    let conf = CONF.get_or_init(|| {
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pod-e2e-containers.conf");
        // podman 4.3's default rlimits cannot be set here (see the module doc).
        std::fs::write(
            &p,
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n",
        )
        .expect("writing containers.conf");
        p
    });
    let mut c = img.podman();
    c.env("CONTAINERS_CONF", conf);
    c
}

/// The image and the helper, or `None` when the machine cannot run them (see tests/it/image.rs).
fn setup(test: &str) -> Option<(&'static Image, &'static Path)> {
    let img = image::image(test)?;
    static HELPER_BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match HELPER_BIN.get_or_init(|| helper(img)) {
        Ok(b) => Some((img, b.as_path())),
        Err(e) => panic!("{test}: {e}"),
    }
}

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Value::String(s.clone()),
        Yaml::Integer(i) => json!(i),
        Yaml::Boolean(b) => json!(b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let k = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        other => format!("{other:?}"),
                    };
                    (k, to_json(v))
                })
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// The value after a short flag (`-p 15001`) in the init args.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

fn ports(list: &str) -> Vec<u16> {
    list.split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

/// Whether a `-i`/`-x` style list (`*`, empty, or CIDRs) covers `ip`.
fn covers(list: &str, ip: IpAddr) -> bool {
    list == "*"
        || list
            .split(',')
            .filter_map(|c| c.trim().parse::<ipnet::IpNet>().ok())
            .any(|n| n.contains(&ip))
}

/// Where a connection a REDIRECT in OUTPUT sent to the proxy's `port` lands: on the loopback
/// address, with the original destination kept for `SO_ORIGINAL_DST`.
fn redirected_locally(port: &str, dst: SocketAddr) -> String {
    let lo = if dst.is_ipv4() { "127.0.0.1" } else { "[::1]" };
    format!("istio-proxy port={port} orig={dst} local={lo}:{port}")
}

/// What the rewrite found in the manifest, and what the traffic must do.
#[derive(Debug, Clone)]
struct Plan {
    manifest: String,
    pod: String,
    /// `istio-init`, or `istio-validation` in Istio CNI mode.
    init: String,
    /// The init container's args as rendered (the variant's come on top).
    args: Vec<String>,
    variant: Vec<String>,
    app: String,
    /// Every container that must start only after the init container.
    containers: Vec<String>,
    proxy_uid: u32,
    proxy_gid: u32,
    tproxy: bool,
    app_ports: BTreeSet<u16>,
    proxy_ports: BTreeSet<u16>,
    peer_ports: BTreeSet<u16>,
    annotations: BTreeMap<String, String>,
    dropped: Vec<String>,
}

impl Plan {
    fn cni(&self) -> bool {
        self.init == "istio-validation"
    }

    fn arg(&self, name: &str) -> Option<&str> {
        flag(&self.args, name)
    }

    /// Where an outbound connection from a non-proxy process lands: `NAME port=N orig=A local=A`.
    fn outbound(&self, dst: SocketAddr) -> String {
        let port = dst.port();
        let captured = !ports(self.arg("-o").unwrap_or("")).contains(&port)
            && (ports(self.arg("-q").unwrap_or("")).contains(&port)
                || (covers(self.arg("-i").unwrap_or("*"), dst.ip())
                    && !covers(self.arg("-x").unwrap_or(""), dst.ip())));
        if captured {
            redirected_locally(self.arg("-p").unwrap_or("15001"), dst)
        } else {
            format!("peer port={port} orig={dst} local={dst}")
        }
    }

    /// Where a connection from the peer to the pod lands.
    fn inbound(&self, dst: SocketAddr) -> String {
        let port = dst.port();
        let b = self.arg("-b").unwrap_or("*");
        let captured = port != 15008
            && if b == "*" {
                !ports(self.arg("-d").unwrap_or("")).contains(&port)
            } else {
                ports(b).contains(&port)
            };
        if captured {
            let z: u16 = self.arg("-z").and_then(|z| z.parse().ok()).unwrap_or(15006);
            // TPROXY keeps the destination; REDIRECT rewrites it to the capture port.
            let local = if self.tproxy {
                dst
            } else {
                SocketAddr::new(dst.ip(), z)
            };
            format!("istio-proxy port={z} orig={dst} local={local}")
        } else if self.proxy_ports.contains(&port) {
            format!("istio-proxy port={port} orig={dst} local={dst}")
        } else {
            format!("{} port={port} orig={dst} local={dst}", self.app)
        }
    }

    /// The args istio-init's subcommands take: the rendered ones without the leading
    /// `istio-iptables` and the validation switches.
    fn config_flags(&self) -> Vec<String> {
        self.args
            .iter()
            .filter(|a| {
                !["istio-iptables", "--run-validation", "--skip-rule-apply"].contains(&a.as_str())
            })
            .cloned()
            .collect()
    }
}

/// Turns an injected manifest into a runnable Pod (see the module doc for every change).
fn runnable(manifest: &str, text: &str, pod: &str, variant: &[&str]) -> (Value, Plan) {
    let docs = YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("{manifest}: {e}"));
    let doc = to_json(&docs[0]);
    let (meta, spec) = if doc["kind"] == "Pod" {
        (doc["metadata"].clone(), doc["spec"].clone())
    } else {
        let t = &doc["spec"]["template"];
        (t["metadata"].clone(), t["spec"].clone())
    };
    let mut annotations = BTreeMap::new();
    let mut dropped = Vec::new();
    let mut kept = serde_json::Map::new();
    for (k, v) in meta["annotations"].as_object().cloned().unwrap_or_default() {
        let v = v.as_str().unwrap_or_default().to_owned();
        if k.starts_with("traffic.sidecar.istio.io/") || k == "sidecar.istio.io/interceptionMode" {
            annotations.insert(k.clone(), v.clone());
        }
        // podman 4.3 rejects annotation values longer than 63 characters.
        if v.len() > 63 {
            dropped.push(k);
        } else {
            kept.insert(k, Value::String(v));
        }
    }
    kept.insert(
        "io.podman.annotations.init.container.type".into(),
        "always".into(),
    );

    let inits = spec["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mains = spec["containers"].as_array().cloned().unwrap_or_default();
    let is_init = |c: &Value| c["name"] == "istio-init" || c["name"] == "istio-validation";
    let mut init = inits
        .iter()
        .find(|c| is_init(c))
        .unwrap_or_else(|| panic!("{manifest}: no istio-init or istio-validation container"))
        .clone();
    let init_name = init["name"].as_str().unwrap_or_default().to_owned();
    let args: Vec<String> = init["args"]
        .as_array()
        .expect("init args")
        .iter()
        .map(|a| a.as_str().unwrap_or_default().to_owned())
        .collect();
    init["image"] = INIT_IMAGE.into();
    init["imagePullPolicy"] = "Never".into();
    if !variant.is_empty() {
        let mut a = init["args"].as_array().cloned().unwrap_or_default();
        a.extend(variant.iter().map(|v| Value::from(*v)));
        init["args"] = Value::Array(a);
    }

    let proxy_uid: u32 = flag(&args, "-u")
        .and_then(|u| u.split(',').next()?.parse().ok())
        .unwrap_or(1337);
    let proxy_gid: u32 = flag(&args, "-g")
        .and_then(|g| g.split(',').next()?.parse().ok())
        .unwrap_or(proxy_uid);
    let tproxy = flag(&args, "-m") == Some("TPROXY");

    let default = meta["annotations"]["kubectl.kubernetes.io/default-container"]
        .as_str()
        .map(str::to_owned);
    let app = default.unwrap_or_else(|| mains[0]["name"].as_str().unwrap_or_default().to_owned());
    let app_spec = mains
        .iter()
        .find(|c| c["name"] == app.as_str())
        .expect("app");
    let mut app_ports: BTreeSet<u16> = app_spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            p["containerPort"]
                .as_i64()
                .and_then(|p| u16::try_from(p).ok())
        })
        .collect();
    app_ports.insert(80);
    let p: u16 = flag(&args, "-p")
        .and_then(|p| p.parse().ok())
        .unwrap_or(15001);
    let z: u16 = flag(&args, "-z")
        .and_then(|p| p.parse().ok())
        .unwrap_or(15006);
    let proxy_ports: BTreeSet<u16> = [p, z].into_iter().chain(PROXY_SIDE_PORTS).collect();
    if let Some(b) = flag(&args, "-b").filter(|b| *b != "*") {
        app_ports.extend(ports(b));
    }
    app_ports.extend(ports(flag(&args, "-d").unwrap_or("")));
    app_ports.retain(|p| !proxy_ports.contains(p) && *p != 0);
    let mut peer_ports: BTreeSet<u16> = [PEER_PORT].into();
    peer_ports.extend(ports(flag(&args, "-o").unwrap_or("")));
    peer_ports.extend(ports(flag(&args, "-q").unwrap_or("")));

    let list = |s: &BTreeSet<u16>| s.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let helper = |name: &str, command: Vec<String>| json!({"name": name, "image": HELPER_IMAGE, "imagePullPolicy": "Never", "command": command});
    let serve = |name: &str, ports: &str| {
        let mut c = vec![HELPER.to_owned(), "serve".into(), name.to_owned()];
        if !ports.is_empty() {
            c.push(ports.to_owned());
        }
        c
    };
    let mut containers = Vec::new();
    let mut names = Vec::new();
    // The proxy, wherever the injector put it (a native sidecar is an init container).
    let mut proxy_cmd = serve("istio-proxy", &list(&proxy_ports));
    let mut caps = json!({"drop": ["ALL"]});
    if tproxy {
        proxy_cmd.push("--transparent".into());
        caps["add"] = json!(["NET_ADMIN"]);
    }
    let mut proxy = helper("istio-proxy", proxy_cmd);
    proxy["securityContext"] = json!({
        "runAsUser": proxy_uid, "runAsGroup": proxy_gid, "runAsNonRoot": proxy_uid != 0,
        "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": caps,
    });
    containers.push(proxy);
    names.push("istio-proxy".to_owned());
    for c in inits
        .iter()
        .filter(|c| !is_init(c) && c["name"] != "istio-proxy")
        .chain(mains.iter())
    {
        let name = c["name"].as_str().unwrap_or_default();
        let ports = if name == app {
            list(&app_ports)
        } else {
            String::new()
        };
        containers.push(helper(name, serve(name, &ports)));
        names.push(name.to_owned());
    }
    let mut network = helper(
        "network",
        vec![HELPER.into(), "wait".into(), POD_V4.into(), pod.into()],
    );
    network["securityContext"] =
        json!({"runAsUser": 65534, "runAsGroup": 65534, "capabilities": {"drop": ["ALL"]}});

    let runnable = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "labels": meta["labels"], "annotations": kept},
        "spec": {
            "restartPolicy": "Never",
            "initContainers": [network, init],
            "containers": containers,
        },
    });
    let plan = Plan {
        manifest: manifest.to_owned(),
        pod: pod.to_owned(),
        init: init_name,
        args,
        variant: variant.iter().map(|s| s.to_string()).collect(),
        app,
        containers: names,
        proxy_uid,
        proxy_gid,
        tproxy,
        app_ports,
        proxy_ports,
        peer_ports,
        annotations,
        dropped,
    };
    (runnable, plan)
}

/// Removes the pod (and with it its network namespace) and stops the peer, whatever happens.
struct Running<'a> {
    img: &'a Image,
    pod: String,
    peer_server: Option<Child>,
    /// What `podman kube play` printed and its exit status.
    play: Option<Output>,
    /// The runnable manifest given to `podman kube play`.
    file: PathBuf,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = output(podman(self.img).args(["pod", "rm", "--force", "--time", "0", &self.pod]));
        let _ = std::fs::remove_file(&self.file);
        if let Some(mut c) = self.peer_server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Running<'_> {
    fn played(&self) -> &Output {
        self.play.as_ref().expect("kube play has run")
    }
}

impl std::fmt::Debug for Running<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("pod", &self.pod).finish()
    }
}

/// The pid of the `network` init container of `pod`, found by its command line.
fn wait_pid(pod: &str, play: &mut Child) -> Result<u32, String> {
    let want: Vec<&str> = vec![HELPER, "wait", POD_V4, pod];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(Some(status)) = play.try_wait() {
            return Err(format!("podman kube play exited early: {status}"));
        }
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let argv: Vec<&str> = cmd
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| std::str::from_utf8(a).unwrap_or_default())
                .collect();
            if argv == want {
                if let Ok(pid) = e.file_name().to_string_lossy().parse() {
                    return Ok(pid);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("the pod's network init container did not start within 60 s".into())
}

/// Starts the pod: the peer namespace and its server, `podman kube play`, the pod's network
/// (and, in CNI mode with `cni_rules`, the rules, as the CNI plugin programs them).
fn play<'a>(
    img: &'a Image,
    helper_bin: &Path,
    peer: &Netns,
    plan: &Plan,
    pod: &Value,
    cni_rules: bool,
) -> Running<'a> {
    let ports: Vec<String> = plan.peer_ports.iter().map(u16::to_string).collect();
    let server = Command::new("ip")
        .args(["netns", "exec", &peer.name])
        .arg(helper_bin)
        .args(["serve", "peer", &ports.join(",")])
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the peer");
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.json", plan.pod));
    // From here on, dropping `running` cleans up whatever exists.
    let mut running = Running {
        img,
        pod: plan.pod.clone(),
        peer_server: Some(server),
        play: None,
        file: file.clone(),
    };
    std::fs::write(&file, serde_json::to_string_pretty(pod).expect("json")).expect("pod file");
    let mut child = podman(img)
        .args(["kube", "play", "--network", "none"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("podman kube play");
    let pid = match wait_pid(&plan.pod, &mut child) {
        Ok(p) => p,
        Err(e) => {
            let _ = child.kill();
            let o = child.wait_with_output().expect("kube play");
            panic!("{}: {e}\n{}", plan.manifest, stderr(&o));
        }
    };
    let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let ns = netns.to_string_lossy().into_owned();
    let in_pod = |argv: &[&str]| {
        let o = output(
            Command::new("nsenter")
                .arg(format!("--net={ns}"))
                .args(argv),
        );
        assert!(o.status.success(), "{argv:?} in the pod: {}", stderr(&o));
    };
    let peer_if = format!("pe{pid}");
    let o = output(Command::new("ip").args([
        "-n", &peer.name, "link", "add", &peer_if, "type", "veth", "peer", "name", "eth0", "netns",
        &ns,
    ]));
    assert!(o.status.success(), "veth into the pod: {}", stderr(&o));
    peer.ok(&[
        "ip",
        "addr",
        "add",
        &format!("{PEER_V4}/24"),
        "dev",
        &peer_if,
    ]);
    peer.ok(&[
        "ip",
        "addr",
        "add",
        &format!("{PEER_V6}/64"),
        "dev",
        &peer_if,
        "nodad",
    ]);
    peer.ok(&["ip", "link", "set", &peer_if, "up"]);
    in_pod(&[
        "ip",
        "addr",
        "add",
        &format!("{POD_V6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    in_pod(&["ip", "link", "set", "eth0", "up"]);
    if cni_rules {
        let mut args = plan.config_flags();
        args.extend(plan.variant.iter().cloned());
        let o = output(util::istio_init().args(&args).arg("--netns").arg(&netns));
        assert!(o.status.success(), "the CNI plugin's part: {}", stderr(&o));
    }
    // Last: the address the `network` init container waits for.
    in_pod(&["ip", "addr", "add", &format!("{POD_V4}/24"), "dev", "eth0"]);
    running.play = Some(child.wait_with_output().expect("podman kube play"));
    running
}

/// Exit code, start and finish (Unix ns; not positive when it never ran) of a pod's container.
fn state(img: &Image, pod: &str, container: &str) -> (i64, i64, i64) {
    let name = format!("{pod}-{container}");
    let o = output(podman(img).args([
        "inspect",
        "--format",
        "{{.State.ExitCode}} {{.State.StartedAt.UnixNano}} {{.State.FinishedAt.UnixNano}}",
        &name,
    ]));
    assert!(o.status.success(), "podman inspect {name}: {}", stderr(&o));
    let v: Vec<i64> = stdout(&o)
        .split_whitespace()
        .map(|x| x.parse().expect("a number"))
        .collect();
    (v[0], v[1], v[2])
}

/// `ADDR -> ANSWER` lines of `pod-helper connect` as (addr, answer) pairs.
fn answers(o: &Output) -> Vec<(SocketAddr, String)> {
    assert!(o.status.success(), "pod-helper connect: {}", stderr(o));
    stdout(o)
        .lines()
        .filter_map(|l| l.split_once(" -> "))
        .map(|(a, b)| (a.parse().expect("address"), b.to_owned()))
        .collect()
}

/// One checked connection: who made it, where it was going, where it must land, where it did.
#[derive(Debug)]
struct Conn {
    dir: &'static str,
    uid: u32,
    gid: u32,
    dst: SocketAddr,
    want: String,
    got: String,
}

impl Conn {
    /// The proxy capture port the connection landed on, if it was captured (a proxy
    /// listener other than the port it was sent to).
    fn captured_on(&self) -> Option<&str> {
        let mut words = self.got.split(' ');
        let who = words.next()?;
        let port = words.next()?.strip_prefix("port=")?;
        (who == "istio-proxy" && port != self.dst.port().to_string()).then_some(port)
    }
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

/// Runs every connection of the plan and returns them (asserting each landed where expected).
fn traffic(img: &Image, helper_bin: &Path, peer: &Netns, plan: &Plan) -> Vec<Conn> {
    let mut conns = Vec::new();
    let exec = |container: &str, dsts: &[SocketAddr]| {
        let mut c = podman(img);
        c.args([
            "exec",
            &format!("{}-{container}", plan.pod),
            HELPER,
            "connect",
        ]);
        c.args(dsts.iter().map(SocketAddr::to_string));
        answers(&output(&mut c))
    };
    // Outbound from the app (root, as the manifests' app containers run).
    let out: Vec<SocketAddr> = plan
        .peer_ports
        .iter()
        .flat_map(|p| [sock(PEER_V4, *p), sock(PEER_V6, *p)])
        .collect();
    for (dst, got) in exec(&plan.app, &out) {
        conns.push(Conn {
            dir: "out",
            uid: 0,
            gid: 0,
            dst,
            want: plan.outbound(dst),
            got,
        });
    }
    // The proxy's own traffic bypasses, except to the pod's own address (over lo), which goes
    // to inbound capture as if it came from outside.
    let app_port = plan.app_ports.first().copied().unwrap_or(80);
    let own = [
        sock(PEER_V4, PEER_PORT),
        sock(PEER_V6, PEER_PORT),
        sock(POD_V4, app_port),
        sock(POD_V6, app_port),
    ];
    for (dst, got) in exec("istio-proxy", &own) {
        let want = if dst.port() == PEER_PORT {
            format!("peer port={PEER_PORT} orig={dst} local={dst}")
        } else {
            redirected_locally(plan.arg("-z").unwrap_or("15006"), dst)
        };
        conns.push(Conn {
            dir: "out",
            uid: plan.proxy_uid,
            gid: plan.proxy_gid,
            dst,
            want,
            got,
        });
    }
    // Inbound from the peer.
    let mut inbound: BTreeSet<u16> = plan.app_ports.clone();
    inbound.extend(PROXY_SIDE_PORTS);
    let dsts: Vec<String> = inbound
        .iter()
        .flat_map(|p| [sock(POD_V4, *p), sock(POD_V6, *p)])
        .map(|a| a.to_string())
        .collect();
    let o = output(
        Command::new("ip")
            .args(["netns", "exec", &peer.name])
            .arg(helper_bin)
            .arg("connect")
            .args(&dsts),
    );
    for (dst, got) in answers(&o) {
        conns.push(Conn {
            dir: "in",
            uid: 0,
            gid: 0,
            want: plan.inbound(dst),
            dst,
            got,
        });
    }
    for c in &conns {
        assert!(
            c.got.starts_with(&format!("{} from=", c.want)),
            "{} {:?}: {} {} (uid {}): want `{}`, got `{}`",
            plan.manifest,
            plan.variant,
            c.dir,
            c.dst,
            c.uid,
            c.want,
            c.got
        );
    }
    conns
}

/// The debug container of docs/kubernetes.md: our image in the pod's network namespace with
/// NET_ADMIN and NET_RAW only.
fn debug(img: &Image, plan: &Plan, entrypoint: Option<&str>, args: &[String]) -> Output {
    let mut c = podman(img);
    c.args([
        "run",
        "--rm",
        "--pull=never",
        "--read-only",
        "--cap-drop=all",
    ])
    .arg("--cap-add=NET_ADMIN,NET_RAW")
    // The container writes straight into this process's pipes. Through conmon's attach
    // socket, the output of a container that exits at once was sometimes lost: a `trace`
    // exited 0 with empty stdout (once in two clean CI runs).
    .arg("--log-driver=passthrough")
    // In the pod, sharing its network namespace: what `kubectl debug` does with an
    // ephemeral container (`--network=container:` is refused for a container in a pod).
    .arg(format!("--pod={}", plan.pod));
    if let Some(e) = entrypoint {
        c.arg(format!("--entrypoint={e}"));
    }
    output(c.arg(INIT_IMAGE).args(args))
}

/// `explain`, `trace` (each kind of connection made) and a dry run from the debug container, against
/// what the traffic did and what the kernel holds.
fn debug_flow(img: &Image, plan: &Plan, conns: &[Conn]) -> usize {
    let flags = plan.config_flags();
    let o = debug(
        img,
        plan,
        None,
        &[vec!["explain".into()], flags.clone()].concat(),
    );
    assert!(o.status.success(), "explain: {}", stderr(&o));
    let explained = stdout(&o);
    // One trace per kind of connection (direction, sender, to the pod itself or not, family,
    // captured or not), run side
    // by side: each is a container start.
    let mut kinds = BTreeSet::new();
    let traced: Vec<&Conn> = conns
        .iter()
        .filter(|c| {
            let own = [POD_V4, POD_V6].contains(&c.dst.ip().to_string().as_str());
            kinds.insert((
                c.dir,
                c.uid,
                own,
                c.dst.is_ipv4(),
                c.captured_on().is_some(),
            ))
        })
        .collect();
    for c in conns {
        if let Some(port) = c.captured_on() {
            assert!(
                explained.contains(&format!("port {port}")),
                "explain never names port {port}, where {} {} landed:\n{explained}",
                c.dir,
                c.dst
            );
        }
    }
    let traces: Vec<(&Conn, Output)> = std::thread::scope(|s| {
        let handles: Vec<_> = traced
            .iter()
            .map(|c| {
                let mut args: Vec<String> = vec!["trace".into(), c.dir.into(), c.dst.to_string()];
                if c.dir == "out" {
                    args.extend([
                        "--uid".into(),
                        c.uid.to_string(),
                        "--gid".into(),
                        c.gid.to_string(),
                    ]);
                    // To the pod's own address the kernel routes over lo; trace assumes eth0
                    // for every non-loopback destination, so say so.
                    if [POD_V4, POD_V6].contains(&c.dst.ip().to_string().as_str()) {
                        args.extend(["--iface".into(), "lo".into()]);
                    }
                }
                args.extend(flags.iter().cloned());
                (*c, s.spawn(move || debug(img, plan, None, &args)))
            })
            .collect();
        handles
            .into_iter()
            .map(|(c, h)| (c, h.join().expect("trace thread")))
            .collect()
    });
    for (c, o) in &traces {
        assert!(
            o.status.success(),
            "trace {} {}: {}",
            c.dir,
            c.dst,
            stderr(o)
        );
        let t = stdout(o);
        let verdict = t
            .lines()
            .find(|l| l.starts_with("Verdict: "))
            .unwrap_or_default();
        match c.captured_on() {
            Some(port) => assert!(
                verdict.contains(&format!("port {port}")),
                "{}: {} {} landed on {port}; trace: {verdict}\n{t}",
                plan.manifest,
                c.dir,
                c.dst
            ),
            None => assert!(
                verdict.starts_with("Verdict: bypass"),
                "{}: {} {} bypassed ({}); trace: {verdict}\n{t}",
                plan.manifest,
                c.dir,
                c.dst,
                c.got
            ),
        }
    }
    let o = debug(
        img,
        plan,
        None,
        &[flags, vec!["--dry-run".into()], plan.variant.clone()].concat(),
    );
    assert!(o.status.success(), "dry run: {}", stderr(&o));
    let dry = stdout(&o);
    if plan.variant.iter().any(|v| v == "--native-nftables") {
        // The image has no `nft`: the host's reads the pod's namespace, and a scratch
        // namespace loaded with the debug container's dry run.
        let scratch = util::Netns::new("poddry");
        crate::nftables::nft_f(&scratch, &dry);
        let o = output(
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", pod_netns(img, plan)))
                .args(["nft", "list", "ruleset"]),
        );
        assert!(
            o.status.success(),
            "nft list ruleset in the pod: {}",
            stderr(&o)
        );
        assert_eq!(
            crate::nftables::zero_counters(&stdout(&o)),
            crate::nftables::listing(&scratch),
            "{}: the pod's nftables rules vs the debug container's dry run",
            plan.manifest
        );
        return traces.len() + 3;
    }
    for family in ["iptables", "ip6tables"] {
        let save = format!("/usr/sbin/{family}-nft-save");
        let o = debug(img, plan, Some(&save), &[]);
        assert!(o.status.success(), "{save}: {}", stderr(&o));
        assert_eq!(
            util::normalized_save(&stdout(&o)),
            image::loaded_rules(&dry, family, "nft"),
            "{}: the pod's {family} rules vs the debug container's dry run",
            plan.manifest
        );
    }
    traces.len() + 4
}

/// The network namespace of a running pod (`/proc/PID/ns/net` of one of its containers).
fn pod_netns(img: &Image, plan: &Plan) -> String {
    let o = output(podman(img).args([
        "ps",
        "--filter",
        &format!("pod={}", plan.pod),
        "--format",
        "{{.ID}}",
    ]));
    let id = stdout(&o).lines().next().unwrap_or_default().to_owned();
    let o = output(podman(img).args(["inspect", "--format", "{{.State.Pid}}", &id]));
    format!("/proc/{}/ns/net", stdout(&o).trim())
}

/// The manifests to run: `POD_E2E_MANIFEST` (scripts/pod-e2e.sh), else every injected pod.
fn manifests() -> Option<Vec<PathBuf>> {
    if let Some(one) = std::env::var_os("POD_E2E_MANIFEST") {
        return Some(vec![PathBuf::from(one)]);
    }
    let dir = util::shared_conformance()?.join("injected-pods");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("injected-pods")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "injected"))
        .collect();
    v.sort();
    Some(v)
}

/// Every injected pod, run by podman as the kubelet would run it, with real traffic through it
/// and the debug-pod flow against it (see the module doc).
#[test]
fn injected_pods_run_by_a_pod_engine_capture_real_traffic() {
    let test = "injected_pods_run_by_a_pod_engine_capture_real_traffic";
    let Some(files) = manifests() else { return };
    let Some((img, helper_bin)) = setup(test) else {
        return;
    };
    if std::env::var_os("POD_E2E_MANIFEST").is_none() {
        assert_eq!(files.len(), 5, "injected-pods: {files:?}");
    }
    let mut seen_cni = false;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        let manifest = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        for (n, variant) in ARG_VARIANTS.iter().enumerate() {
            let t0 = Instant::now();
            let pod = format!("ii-e2e-{}-{n}", std::process::id());
            let (spec, plan) = runnable(&manifest, &text, &pod, variant);
            check_annotations(&plan);
            let peer = Netns::new("podpeer");
            let running = play(img, helper_bin, &peer, &plan, &spec, plan.cni());
            assert!(
                running.played().status.success(),
                "{manifest} {variant:?}: podman kube play: {}\n{}",
                stderr(running.played()),
                serde_json::to_string_pretty(&spec).unwrap_or_default()
            );
            // The init container exited 0 before any other container started.
            let (code, init_started, finished) = state(img, &pod, &plan.init);
            assert_eq!(code, 0, "{manifest}: {} exit code", plan.init);
            assert!(
                // (podman records a start time after `runc start` returns: for a container
                // that exits within microseconds it can be later than the finish time.)
                init_started > 0 && finished > 0,
                "{manifest}: {} did not run ({init_started}, {finished})",
                plan.init
            );
            for c in &plan.containers {
                let (_, started, _) = state(img, &pod, c);
                assert!(
                    started > finished,
                    "{manifest}: {c} started ({started}) before {} finished ({finished})",
                    plan.init
                );
            }
            let conns = traffic(img, helper_bin, &peer, &plan);
            let checks = debug_flow(img, &plan, &conns);
            drop(running);
            let mut summary = format!(
                "pods: {manifest} {variant:?}: {} ({}), {} connections checked, {checks} debug-container runs",
                plan.init,
                if plan.tproxy { "TPROXY" } else { "REDIRECT" },
                conns.len(),
            );
            if plan.cni() {
                seen_cni = true;
                validation_fails_without_rules(img, helper_bin, &manifest, &text, variant);
                summary += ", and without rules: istio-validation 126, no container started";
            }
            eprintln!(
                "{summary}; dropped annotations {:?}; {:.1} s",
                plan.dropped,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    if std::env::var_os("POD_E2E_MANIFEST").is_none() {
        assert!(seen_cni, "no Istio CNI manifest among {files:?}");
    }
}

/// Every traffic annotation the manifest carries is in the init args the injector rendered
/// (the traffic checks then hold those args to account).
fn check_annotations(plan: &Plan) {
    for (k, v) in &plan.annotations {
        let (flag, exact) = match k.rsplit('/').next().unwrap_or_default() {
            "includeOutboundIPRanges" => ("-i", true),
            "excludeOutboundIPRanges" => ("-x", true),
            "includeInboundPorts" => ("-b", true),
            "excludeInboundPorts" => ("-d", false),
            "excludeOutboundPorts" => ("-o", true),
            "includeOutboundPorts" => ("-q", true),
            "interceptionMode" => ("-m", true),
            _ => continue,
        };
        let got = plan.arg(flag).unwrap_or_default();
        if exact {
            assert_eq!(got, v, "{}: {k} vs {flag}", plan.manifest);
        } else {
            for p in v.split(',') {
                assert!(
                    got.split(',').any(|g| g == p),
                    "{}: {k}={v} vs {flag} {got}",
                    plan.manifest
                );
            }
        }
    }
}

/// Istio CNI mode without the CNI plugin's rules: `istio-validation` exits 126 and no other
/// container ever starts.
fn validation_fails_without_rules(
    img: &Image,
    helper_bin: &Path,
    manifest: &str,
    text: &str,
    variant: &[&str],
) {
    let pod = format!("ii-e2e-norules-{}", std::process::id());
    let (spec, plan) = runnable(manifest, text, &pod, variant);
    let peer = Netns::new("podpeer");
    let running = play(img, helper_bin, &peer, &plan, &spec, false);
    assert!(
        !running.played().status.success(),
        "{manifest}: kube play succeeded without the rules"
    );
    let (code, started, _) = state(img, &pod, &plan.init);
    assert!(started > 0, "{manifest}: istio-validation never ran");
    assert_eq!(code, 126, "{manifest}: istio-validation without rules");
    for c in &plan.containers {
        let (_, started, _) = state(img, &pod, c);
        assert!(
            started <= 0,
            "{manifest}: {c} started although validation failed"
        );
    }
}
