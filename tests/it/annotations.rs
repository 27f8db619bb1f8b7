//! Pod annotations: conformance with Istio's sidecar injector over every case of
//! `../shared/conformance/injector-cases.json`, and the CLI behaviour of `--annotations`,
//! `--pod` and `explain`.
//!
//! Conformance: for each case, the arguments the injector rendered give one configuration and
//! one dry run; the annotation path — the mesh's settings as flags and env vars, plus the pod's
//! annotations as a Downward API file (and as a Pod manifest) — must give the same.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;

use serde_json::{Value, json};

use istio_init::Env;
use istio_init::settings::config::Config;
use istio_init::settings::{annotations, cli};

use crate::util::{istio_init, output, shared_conformance, stderr, stdout};

/// Go's `%q` (`strconv.Quote`) for the values the fixtures hold: how the kubelet writes a
/// Downward API annotations file.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The Downward API file: keys sorted, `key="value"` lines, no trailing newline.
fn downward_file(ann: &BTreeMap<String, String>) -> String {
    ann.iter()
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A Pod manifest in the block style `kubectl get pod -o yaml` prints (values double-quoted).
fn yaml_manifest(name: &str, ann: &BTreeMap<String, String>) -> String {
    let mut y =
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: test\n");
    if !ann.is_empty() {
        y.push_str("  annotations:\n");
        for (k, v) in ann {
            // JSON string escapes are valid YAML double-quoted escapes.
            y.push_str(&format!("    {}: {}\n", json!(k), json!(v)));
        }
    }
    y.push_str("spec:\n  containers:\n  - name: app\n    image: app\n");
    y
}

/// The same pod as a Deployment in JSON.
fn json_manifest(name: &str, ann: &BTreeMap<String, String>) -> String {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"template": {"metadata": {"annotations": ann}, "spec": {"containers": []}}}
    })
    .to_string()
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The mesh-wide part of a case: the arguments and env the injector renders for a pod without
/// annotations under the case's settings, plus `--status-port` (the one mesh value `-d`
/// alone cannot carry).
fn mesh_invocation(
    default_args: &[String],
    case: &Value,
) -> (Vec<String>, BTreeMap<String, String>) {
    let mesh = case["mesh_overrides"].as_object().expect("mesh_overrides");
    let get = |k: &str| mesh.get(k).map(str_of);
    let mut args: Vec<String> = default_args.to_vec();
    let mut set = |flag: &str, value: String| {
        let i = args.iter().position(|a| a == flag).expect(flag);
        args[i + 1] = value;
    };
    if let Some(m) = get("meshConfig.defaultConfig.interceptionMode") {
        set("-m", m);
    }
    if let Some(v) = get("values.global.proxy.includeIPRanges") {
        set("-i", v);
    }
    if let Some(v) = get("values.global.proxy.excludeIPRanges") {
        set("-x", v);
    }
    let status = get("values.global.proxy.statusPort").unwrap_or_else(|| "15020".into());
    let excluded = get("values.global.proxy.excludeInboundPorts").unwrap_or_default();
    let mut d = "15090,15021".to_owned();
    for item in excluded.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        d.push(',');
        d.push_str(item);
    }
    if status != "0" && !excluded.split(',').any(|p| p == status) {
        d.push(',');
        d.push_str(&status);
    }
    set("-d", d);
    let openshift_range = get("namespace(test-ns).annotations.openshift.io/sa.scc.uid-range");
    if let Some(range) = openshift_range {
        let (start, size) = range.split_once('/').expect("uid range");
        let top = start.parse::<u64>().expect("range start")
            + size.parse::<u64>().expect("range size")
            - 1;
        set("-u", top.to_string());
    } else if let Some(uid) = case
        .get("user_istio_proxy_runAsUser")
        .filter(|v| !v.is_null())
    {
        set("-u", str_of(uid));
    }
    if mesh.get("components.cni.enabled") == Some(&Value::Bool(true)) {
        args.push("--run-validation".into());
        args.push("--skip-rule-apply".into());
    }
    args.push(format!("--status-port={status}"));
    let env = mesh
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("meshConfig.defaultConfig.proxyMetadata.")
                .map(|name| (name.to_owned(), str_of(v)))
        })
        .collect();
    (args, env)
}

fn parse(args: &[String]) -> cli::Invocation {
    let mut argv = vec!["istio-init".to_owned()];
    argv.extend_from_slice(args);
    cli::parse(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// A config with the sources stripped (they differ by design: flag vs annotation). The status
/// port is left out: the rendered args do not carry it (the injector folds it into `-d`).
fn comparable(c: &Config) -> (Config, Vec<(&'static str, String)>) {
    let mut bare = c.clone();
    bare.provenance.clear();
    let values = c
        .provenance
        .iter()
        .filter(|p| p.key != "STATUS_PORT")
        .map(|p| (p.key, p.value.clone()))
        .collect();
    (bare, values)
}

fn dry_run(
    args: &[String],
    env: &BTreeMap<String, String>,
    extra: &[&str],
    stdin: Option<&str>,
) -> String {
    let mut cmd = istio_init();
    cmd.args(args)
        .args(["--dry-run", "--ipv6=true"])
        .args(extra)
        .envs(env);
    let o = match stdin {
        None => output(&mut cmd),
        Some(text) => {
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawning istio-init");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("stdin");
            child.wait_with_output().expect("waiting")
        }
    };
    assert!(o.status.success(), "{args:?} {extra:?}: {}", stderr(&o));
    stdout(&o)
}

#[test]
fn every_injector_case_matches_the_rendered_args() {
    let Some(dir) = shared_conformance() else {
        return;
    };
    let text =
        std::fs::read_to_string(dir.join("injector-cases.json")).expect("injector-cases.json");
    let doc: Value = serde_json::from_str(&text).expect("injector-cases.json is JSON");
    let default_args: Vec<String> = doc["default_args"]
        .as_array()
        .expect("default_args")
        .iter()
        .map(str_of)
        .collect();
    let cases = doc["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 110, "the file's case count changed");
    let tmp = std::env::temp_dir().join(format!("ii-annot-conf-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let mut with_traffic_annotations = 0;
    for (n, case) in cases.iter().enumerate() {
        let name = case["fixture"].as_str().expect("fixture");
        let rendered: Vec<String> = case["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(str_of)
            .collect();
        let rendered_env: BTreeMap<String, String> = case["env"]
            .as_object()
            .expect("env")
            .iter()
            .map(|(k, v)| (k.clone(), str_of(v)))
            .collect();
        let ann: BTreeMap<String, String> = case["annotations"]
            .as_object()
            .expect("annotations")
            .iter()
            .map(|(k, v)| (k.clone(), str_of(v)))
            .collect();
        if ann.keys().any(|k| {
            k.starts_with("traffic.")
                || k.contains("interceptionMode")
                || k.starts_with("istio.io/")
                || k.starts_with("status.")
        }) {
            with_traffic_annotations += 1;
        }
        let (mesh_args, mesh_env) = mesh_invocation(&default_args, case);

        // In-process: the same Config (values and settings), sources aside.
        let want_inv = parse(&rendered);
        let want_lookup = |k: &str| rendered_env.get(k).cloned();
        let want = istio_init::resolve(&want_inv, &Env { var: &want_lookup })
            .unwrap_or_else(|e| panic!("{name}: rendered args: {e}"));
        let mesh_inv = parse(&mesh_args);
        let mesh_lookup = |k: &str| mesh_env.get(k).cloned();
        let file = downward_file(&ann);
        let parsed =
            annotations::parse_downward(&file).unwrap_or_else(|e| panic!("{name}: {e}\n{file}"));
        assert_eq!(parsed, ann, "{name}: the annotations file round-trips");
        let pod = annotations::translate(&parsed).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(pod.nothing_to_do.is_none(), "{name}");
        let got =
            istio_init::resolve_for_pod(&mesh_inv, &Env { var: &mesh_lookup }, &pod.overrides)
                .unwrap_or_else(|e| panic!("{name}: annotation path: {e}"));
        assert_eq!(
            comparable(&got),
            comparable(&want),
            "{name}: config differs\nmesh args {mesh_args:?}\nannotations {ann:?}"
        );

        let manifest = if n % 2 == 0 {
            yaml_manifest(name, &ann)
        } else {
            json_manifest(name, &ann)
        };
        let pod2 = annotations::translate_pod(
            &annotations::parse_manifest(&manifest)
                .unwrap_or_else(|e| panic!("{name}: {e}\n{manifest}")),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            pod2.overrides, pod.overrides,
            "{name}: manifest and annotations file disagree"
        );

        // The binary: the same dry run, through the files.
        let want_text = dry_run(&rendered, &rendered_env, &[], None);
        let path = tmp.join(format!("{n}.annotations"));
        std::fs::write(&path, &file).expect("writing annotations");
        let got_text = dry_run(
            &mesh_args,
            &mesh_env,
            &["--annotations", path.to_str().unwrap()],
            None,
        );
        assert_eq!(
            got_text, want_text,
            "{name}: dry run differs (--annotations)"
        );
        // The manifest through stdin for a third of the cases, else through a file.
        let got_text = if n % 3 == 0 {
            dry_run(&mesh_args, &mesh_env, &["--pod", "-"], Some(&manifest))
        } else {
            let path = tmp.join(format!("{n}.manifest"));
            std::fs::write(&path, &manifest).expect("writing manifest");
            dry_run(
                &mesh_args,
                &mesh_env,
                &["--pod", path.to_str().unwrap()],
                None,
            )
        };
        assert_eq!(got_text, want_text, "{name}: dry run differs (--pod)");
    }
    let _ = std::fs::remove_dir_all(&tmp);
    // The data must actually exercise annotations (guards against a silently empty file).
    assert!(
        with_traffic_annotations >= 10,
        "only {with_traffic_annotations} cases carry traffic annotations"
    );
}

/// Runs the binary with an annotations file holding `text`.
fn with_annotations(text: &str, args: &[&str]) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!(
        "ii-annot-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("annotations");
    std::fs::write(&path, text).expect("writing annotations");
    let o = output(istio_init().args(args).arg("--annotations").arg(&path));
    let _ = std::fs::remove_dir_all(&dir);
    o
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[test]
fn bad_annotation_value_exits_2_naming_it() {
    let o = with_annotations(
        "traffic.sidecar.istio.io/excludeInboundPorts=\"80x\"",
        &["--dry-run", "--ipv6=false"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "error: invalid port \"80x\" in annotation traffic.sidecar.istio.io/excludeInboundPorts: not a number\n"
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn malformed_files_exit_2_with_line_or_path() {
    let o = with_annotations("a=\"1\"\nb=unquoted", &["--dry-run"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.starts_with("error: annotations file /"), "{e}");
    assert!(
        e.ends_with(": line 2: value of b: \"unquoted\" is not a double-quoted string\n"),
        "{e}"
    );

    let o = output(istio_init().args(["--dry-run", "--pod", "/nonexistent/pod.yaml"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).starts_with("error: cannot read the pod manifest /nonexistent/pod.yaml: "),
        "{}",
        stderr(&o)
    );

    let mut child = istio_init()
        .args(["--dry-run", "--pod", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"kind: Pod\nmetadata:\n  annotations:\n    traffic.sidecar.istio.io/includeInboundPorts: 8080\n")
        .expect("write");
    let o = child.wait_with_output().expect("wait");
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "error: pod manifest -: metadata.annotations[\"traffic.sidecar.istio.io/includeInboundPorts\"]: expected a string, found an integer (quote the value)\n"
    );
    assert!(o.stdout.is_empty());

    let o = output(istio_init().args(["--dry-run", "--pod", "-", "--annotations", "x"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("give one of them"), "{}", stderr(&o));
}

#[test]
fn unknown_traffic_annotation_warns_and_continues() {
    let o = with_annotations(
        "traffic.sidecar.istio.io/excludeOutboundIpRanges=\"10.0.0.0/8\"",
        &["--dry-run", "--ipv6=false"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("ignoring unknown annotation traffic.sidecar.istio.io/excludeOutboundIpRanges (did you mean traffic.sidecar.istio.io/excludeOutboundIPRanges?)"),
        "{}",
        stderr(&o)
    );
    assert!(!stdout(&o).contains("10.0.0.0/8"), "{}", stdout(&o));
}

#[test]
fn nothing_to_do_exits_0_without_rules() {
    for text in [
        "sidecar.istio.io/interceptionMode=\"NONE\"",
        "sidecar.istio.io/inject=\"false\"",
        "proxy.istio.io/config=\"interceptionMode: NONE\\n\"",
    ] {
        let o = with_annotations(text, &["--dry-run"]);
        assert!(o.status.success(), "{text}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{text}: {}", stdout(&o));
        assert!(
            stderr(&o).contains("nothing to do"),
            "{text}: {}",
            stderr(&o)
        );
    }
    // Not a dry run either: nothing is applied, so nothing can fail.
    let o = with_annotations("sidecar.istio.io/inject=\"false\"", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn explain_names_annotation_sources() {
    let o = with_annotations(
        "proxy.istio.io/config=\"proxyMetadata:\\n  ISTIO_META_DNS_CAPTURE: \\\"true\\\"\\n\"\nstatus.sidecar.istio.io/port=\"123\"\ntraffic.sidecar.istio.io/includeInboundPorts=\"8080\"",
        &["explain", "--ipv6=false", "--capture-all-dns"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let line = |key: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("{key} missing:\n{out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        line("INBOUND_PORTS_INCLUDE"),
        "INBOUND_PORTS_INCLUDE 8080 annotation traffic.sidecar.istio.io/includeInboundPorts"
    );
    assert_eq!(
        line("INBOUND_PORTS_EXCLUDE"),
        "INBOUND_PORTS_EXCLUDE 15090,15021,123 annotation status.sidecar.istio.io/port"
    );
    assert_eq!(
        line("DNS_CAPTURE"),
        "DNS_CAPTURE true annotation proxy.istio.io/config (proxyMetadata.ISTIO_META_DNS_CAPTURE)"
    );
    assert_eq!(
        line("CAPTURE_ALL_DNS"),
        "CAPTURE_ALL_DNS true --capture-all-dns"
    );
    assert!(
        out.contains("- only ports 8080 are redirected to port 15006;"),
        "{out}"
    );
    assert!(
        out.contains(
            "- TCP and UDP port 53 to any destination is redirected to the agent on port 15053"
        ),
        "{out}"
    );
}

#[test]
fn normal_run_logs_the_summary_with_annotations_applied() {
    let o = with_annotations(
        "traffic.sidecar.istio.io/includeInboundPorts=\"8080\"\ntraffic.sidecar.istio.io/excludeOutboundPorts=\"5432\"",
        &["--dry-run", "--ipv6=false"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("INBOUND_PORTS_INCLUDE=8080  # from annotation traffic.sidecar.istio.io/includeInboundPorts\n"), "{e}");
    assert!(
        e.contains("what the rules do:\nRules for IPv4 only.\n"),
        "{e}"
    );
    assert!(
        e.contains("- only ports 8080 are redirected to port 15006;"),
        "{e}"
    );
    assert!(
        e.contains("  - destination ports 5432 (TCP and UDP, any destination)\n"),
        "{e}"
    );
    let out = stdout(&o);
    assert!(
        out.contains("-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT\n"),
        "{out}"
    );
    assert!(
        out.contains("-A ISTIO_OUTPUT -p udp --dport 5432 -j RETURN\n"),
        "{out}"
    );
}
