//! The container image, tested as a container: `image/build.sh` builds it with buildah into an
//! OCI archive, and podman (runc) runs it inside network namespaces these tests create, with
//! `--cap-drop=all --cap-add=NET_ADMIN,NET_RAW --read-only` and the injector's own arguments.
//!
//! Needs root, iproute2, iptables, buildah, podman and runc. Without them every test here prints
//! `skipped:` (and fails under `CI=true`). The image is built once per test process into
//! `$CARGO_TARGET_TMPDIR/image` (the static binary with its own `CARGO_TARGET_DIR`, so the build
//! never waits on the lock of the `cargo test` that runs us) and loaded into a private podman
//! store with vfs storage: nothing touches the machine's own container storage.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use crate::util::{self, Netns, output, stderr, stdout};

/// The image loaded into a private podman store (shared with tests/it/pods.rs).
#[derive(Debug)]
pub(crate) struct Image {
    /// Image id in the private store.
    pub(crate) id: String,
    /// The static istio-init binary the image holds (its build context's copy).
    pub(crate) binary: PathBuf,
    root: PathBuf,
    runroot: PathBuf,
}

/// Capabilities given to the container (always after `--cap-drop=all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caps {
    NetAdminRaw,
    None,
}

/// One `podman run` of the image.
#[derive(Debug)]
pub(crate) struct Run<'a> {
    caps: Caps,
    /// `--network ns:<path>`; `None` gives `--network none`.
    netns: Option<&'a Netns>,
    entrypoint: Option<&'a str>,
    /// Extra `podman run` options (`-v`, `-e`, `--read-only-tmpfs=false`).
    pub(crate) opts: Vec<String>,
    args: Vec<String>,
    stdin: Option<String>,
}

impl<'a> Run<'a> {
    pub(crate) fn new(caps: Caps, netns: Option<&'a Netns>, args: &[&str]) -> Self {
        Run {
            caps,
            netns,
            entrypoint: None,
            opts: Vec::new(),
            args: args.iter().map(|s| s.to_string()).collect(),
            stdin: None,
        }
    }
}

impl Image {
    /// `podman` with the private store (vfs), runc and no systemd or journald.
    pub(crate) fn podman(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .arg("--tmpdir")
            .arg(self.runroot.join("libpod"))
            .args([
                "--storage-driver",
                "vfs",
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ]);
        c
    }

    pub(crate) fn run(&self, r: &Run<'_>) -> Output {
        let mut c = self.podman();
        c.args(["run", "--rm", "--pull=never"])
            // This machine's podman cannot raise these limits without them (see the brief).
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .arg("--cap-drop=all")
            .arg("--read-only");
        if r.caps == Caps::NetAdminRaw {
            c.arg("--cap-add=NET_ADMIN,NET_RAW");
        }
        match r.netns {
            Some(ns) => c.arg(format!("--network=ns:{}", ns.path().display())),
            None => c.arg("--network=none"),
        };
        if let Some(e) = r.entrypoint {
            c.arg(format!("--entrypoint={e}"));
        }
        if r.stdin.is_some() {
            c.arg("-i");
        }
        c.args(&r.opts).arg(&self.id).args(&r.args);
        let Some(input) = &r.stdin else {
            return output(&mut c);
        };
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning podman: {e}"));
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(input.as_bytes()).expect("writing stdin");
        }
        child.wait_with_output().expect("waiting for podman")
    }
}

fn build_and_load() -> Result<Image, String> {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let out = tmp.join("image");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = output(
        Command::new("bash")
            .arg(repo.join("image/build.sh"))
            .arg("--out")
            .arg(&out)
            .env("CARGO_TARGET_DIR", tmp.join("image-cargo")),
    );
    if !o.status.success() {
        return Err(format!("image/build.sh failed:\n{}", stderr(&o)));
    }
    let archive = PathBuf::from(stdout(&o).trim());
    // A short runroot: conmon's socket paths must stay under the 108-byte limit.
    let runroot = std::env::temp_dir().join(format!("ii-podman-{:08x}", fnv(tmp)));
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    let image = Image {
        id: String::new(),
        binary: out.join(format!("context/rootfs-{arch}/usr/local/bin/istio-init")),
        root: tmp.join("podman"),
        runroot,
    };
    let o = output(image.podman().arg("load").arg("-q").arg("-i").arg(&archive));
    if !o.status.success() {
        return Err(format!("podman load {}: {}", archive.display(), stderr(&o)));
    }
    let name = stdout(&o)
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_owned();
    let o = output(
        image
            .podman()
            .args(["image", "inspect", "--format", "{{.Id}}", &name]),
    );
    if !o.status.success() {
        return Err(format!("podman image inspect {name}: {}", stderr(&o)));
    }
    // Earlier builds' images are now untagged: drop them so the private store does not grow.
    let _ = output(image.podman().args(["image", "prune", "--force"]));
    Ok(Image {
        id: stdout(&o).trim().to_owned(),
        ..image
    })
}

fn fnv(p: &Path) -> u32 {
    p.as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
        })
}

/// The image, or `None` (after printing `skipped:`) when this machine cannot build or run it.
/// Panics under CI when something is missing, and always when the build itself fails.
pub(crate) fn image(test: &str) -> Option<&'static Image> {
    if !util::privileged(test) {
        return None;
    }
    if let Some(missing) = ["buildah", "podman", "runc"]
        .into_iter()
        .find(|t| util::which(t).is_none())
    {
        let msg = format!(
            "{test}: image test cannot run: `{missing}` is not installed \
             (apt-get install buildah podman runc)"
        );
        assert!(!util::in_ci(), "{msg}");
        eprintln!("skipped: {msg}");
        return None;
    }
    static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
    match IMAGE.get_or_init(build_and_load) {
        Ok(i) => Some(i),
        Err(e) => panic!("{test}: {e}"),
    }
}

fn injected_args() -> Option<Vec<Vec<String>>> {
    let dir = util::shared_conformance()?;
    let text = std::fs::read_to_string(dir.join("injected-args.json")).expect("injected-args");
    Some(serde_json::from_str(&text).expect("injected-args.json is a list of lists"))
}

/// iptables-save of one backend and family with comments and counters removed.
fn saved(ns: &Netns, program: &str) -> String {
    ns.save(program)
}

/// Every table's rules in every backend and family, to show a namespace is untouched.
fn istio_lines(ns: &Netns) -> Vec<String> {
    let mut found = Vec::new();
    for p in [
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ] {
        for line in saved(ns, p).lines().filter(|l| l.contains("ISTIO")) {
            found.push(format!("{p}: {line}"));
        }
    }
    found
}

/// The legacy tables instantiated in the namespace (a footprint even when empty).
fn legacy_tables(ns: &Netns) -> String {
    ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]
        .into_iter()
        .map(|f| ns.run(&["cat", f]))
        .filter(|o| o.status.success())
        .map(|o| stdout(&o))
        .collect()
}

/// The host binary (the one under test, not the image's) run in `ns` with a clean environment.
fn host_run(ns: &Netns, args: &[&str]) -> Output {
    let mut c = ns.cmd(&[&[util::bin()], args].concat());
    c.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    output(&mut c)
}

/// The IPv4 part of a dry run (`# IPv4 …` up to `# IPv6 …`).
fn ipv4_part(dry_run: &str) -> String {
    dry_run
        .split("\n# IPv6")
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The IPv4 rules the host's own iptables (`backend`: nft or legacy) holds after loading the
/// host binary's dry run of `args` into a fresh namespace: what a correct apply must produce.
fn reference_rules(args: &[&str], backend: &str) -> String {
    let reference = Netns::new(&format!("imgref{backend}"));
    let dry = host_run(&reference, &[args, &["--dry-run"]].concat());
    assert!(dry.status.success(), "dry run: {}", stderr(&dry));
    loaded_rules(&stdout(&dry), "iptables", backend)
}

/// The rules the host's own `family` (`iptables` or `ip6tables`) of `backend` (nft or legacy)
/// holds after loading that family's part of a dry run into a fresh namespace (iptables-save,
/// normalised).
pub(crate) fn loaded_rules(dry_run: &str, family: &str, backend: &str) -> String {
    let reference = Netns::new(&format!("imgload{backend}"));
    let part = match family {
        "ip6tables" => dry_run
            .split_once("\n# IPv6")
            .map(|(_, v6)| format!("# IPv6{v6}"))
            .unwrap_or_default(),
        _ => ipv4_part(dry_run),
    };
    let restore = format!("{family}-{backend}-restore");
    let r = reference.run_with_input(&[&restore, "--noflush"], &part);
    assert!(r.status.success(), "reference {restore}: {}", stderr(&r));
    saved(&reference, &format!("{family}-{backend}-save"))
}

/// The injector's default argument list, verbatim, run by the image with only NET_ADMIN and
/// NET_RAW and a read-only root filesystem (not even a tmpfs on /run): exit 0, and the
/// namespace then holds exactly the ruleset a dry run of the same arguments prints, in nf_tables
/// and nowhere else.
#[test]
fn image_applies_the_injected_default_args_with_net_admin_and_net_raw() {
    let test = "image_applies_the_injected_default_args_with_net_admin_and_net_raw";
    let Some(img) = image(test) else { return };
    let Some(all) = injected_args() else { return };
    let args: Vec<&str> = all[0].iter().map(String::as_str).collect();
    assert_eq!(args[0], "istio-iptables", "first injected entry: {args:?}");

    let ns = Netns::new("imgapply");
    let mut run = Run::new(Caps::NetAdminRaw, Some(&ns), &args);
    run.opts.push("--read-only-tmpfs=false".into());
    let o = img.run(&run);
    assert_eq!(
        o.status.code(),
        Some(0),
        "podman run {args:?}:\n{}",
        stderr(&o)
    );

    // Independent facts about the default sidecar ruleset (behaviour doc §4.2).
    let nat = saved(&ns, "iptables-nft-save");
    for want in [
        ":ISTIO_INBOUND -",
        ":ISTIO_IN_REDIRECT -",
        ":ISTIO_OUTPUT -",
        ":ISTIO_REDIRECT -",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    ] {
        assert!(
            nat.lines().any(|l| l == want),
            "missing {want:?} in:\n{nat}"
        );
    }

    // Exactly the dry run of the same arguments, loaded by the host's iptables into a second
    // fresh namespace.
    assert_eq!(nat, reference_rules(&args, "nft"));

    // Nothing in the other backend, not even an instantiated legacy table.
    assert_eq!(
        saved(&ns, "ip6tables-nft-save"),
        "",
        "no IPv6 in this namespace"
    );
    assert_eq!(legacy_tables(&ns), "", "legacy tables were instantiated");
}

/// Without the capabilities the run fails with the clear error (exit 1, naming what is
/// missing) and the namespace is untouched in every backend and family.
#[test]
fn image_without_capabilities_fails_clearly_and_applies_nothing() {
    let test = "image_without_capabilities_fails_clearly_and_applies_nothing";
    let Some(img) = image(test) else { return };
    let Some(all) = injected_args() else { return };
    let args: Vec<&str> = all[0].iter().map(String::as_str).collect();

    let ns = Netns::new("imgnocaps");
    let o = img.run(&Run::new(Caps::None, Some(&ns), &args));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{err}");
    for cap in ["NET_ADMIN", "NET_RAW"] {
        assert!(last.contains(cap), "the error does not name {cap}: {last}");
    }
    assert!(o.stdout.is_empty(), "{}", stdout(&o));
    assert_eq!(istio_lines(&ns), Vec::<String>::new());
    assert_eq!(legacy_tables(&ns), "", "legacy tables were instantiated");
}

/// The legacy backend on a read-only root filesystem (no tmpfs on /run, so iptables' own
/// `/run/xtables.lock` cannot be created): applied, in legacy only, and a second run of the same
/// container changes nothing.
#[test]
fn image_applies_with_the_legacy_backend_on_a_read_only_root() {
    let test = "image_applies_with_the_legacy_backend_on_a_read_only_root";
    let Some(img) = image(test) else { return };
    let Some(all) = injected_args() else { return };
    let args: Vec<&str> = all[0].iter().map(String::as_str).collect();

    let ns = Netns::new("imglegacy");
    let mut run = Run::new(Caps::NetAdminRaw, Some(&ns), &args);
    run.opts.push("--read-only-tmpfs=false".into());
    run.opts.push("--env=FORCE_IPTABLES_BINARY=legacy".into());
    let o = img.run(&run);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let legacy = saved(&ns, "iptables-legacy-save");
    assert_eq!(legacy, reference_rules(&args, "legacy"));
    assert!(
        !saved(&ns, "iptables-nft-save").contains("ISTIO"),
        "rules in both backends"
    );

    let o = img.run(&run);
    assert_eq!(o.status.code(), Some(0), "second run: {}", stderr(&o));
    assert_eq!(
        saved(&ns, "iptables-legacy-save"),
        legacy,
        "the second run changed the rules"
    );
}

/// Non-root works when the runtime passes the capabilities in the ambient set, as podman does
/// for `--user` (Kubernetes runtimes do not; see image/README.md): UID 1337 with NET_ADMIN and
/// NET_RAW applies the rules; UID 1337 without them gets the clear error and nothing changes.
#[test]
fn image_runs_as_non_root_when_the_runtime_sets_ambient_capabilities() {
    let test = "image_runs_as_non_root_when_the_runtime_sets_ambient_capabilities";
    let Some(img) = image(test) else { return };
    let Some(all) = injected_args() else { return };
    let args: Vec<&str> = all[0].iter().map(String::as_str).collect();

    let ns = Netns::new("imgnoroot");
    let mut run = Run::new(Caps::None, Some(&ns), &args);
    run.opts.push("--user=1337:1337".into());
    let o = img.run(&run);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("NET_ADMIN"), "{}", stderr(&o));
    assert_eq!(istio_lines(&ns), Vec::<String>::new());

    run.caps = Caps::NetAdminRaw;
    let o = img.run(&run);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        saved(&ns, "iptables-nft-save"),
        reference_rules(&args, "nft")
    );
}

/// The custom injection template of docs/kubernetes.md, run as written: its `args` (taken from
/// the doc) with the pod's annotations file mounted where the template mounts `istio-podinfo`.
/// An annotation changes the rules exactly as the injector's flag would; `interceptionMode:
/// NONE` is a successful no-op.
#[test]
fn image_runs_the_annotations_template_of_the_recipes() {
    let test = "image_runs_the_annotations_template_of_the_recipes";
    let Some(img) = image(test) else { return };
    let (found, _) = crate::kubernetes::load_docs();
    let c = found
        .containers
        .iter()
        .find(|c| {
            c.args
                .as_ref()
                .is_some_and(|a| a.iter().any(|x| x == "--annotations"))
        })
        .expect("docs/kubernetes.md has a template passing --annotations");
    let args: Vec<&str> = c
        .args
        .as_ref()
        .unwrap()
        .iter()
        .map(String::as_str)
        .collect();
    let mount = c.y["volumeMounts"][0]["mountPath"]
        .as_str()
        .expect("mountPath");

    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("podinfo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("podinfo dir");
    let cases = [
        (
            "excluded",
            // Downward API format: sorted keys, Go-quoted values, no trailing newline.
            "istio.io/rev=\"default\"\ntraffic.sidecar.istio.io/excludeOutboundPorts=\"5432\"",
        ),
        ("none", "sidecar.istio.io/interceptionMode=\"NONE\""),
    ];
    for (name, text) in cases {
        std::fs::write(dir.join(name), text).expect("annotations file");
        let ns = Netns::new(&format!("imgann{name}"));
        let mut run = Run::new(Caps::NetAdminRaw, Some(&ns), &args);
        run.opts.push(format!(
            "--volume={}:{mount}/annotations:ro",
            dir.join(name).display()
        ));
        let o = img.run(&run);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        if name == "none" {
            assert_eq!(istio_lines(&ns), Vec::<String>::new(), "NONE applied rules");
            continue;
        }
        // The same as the injector's rendering of that annotation: `-o 5432`.
        let nat = saved(&ns, "iptables-nft-save");
        let cut = args.iter().position(|a| *a == "--annotations").unwrap();
        let want = reference_rules(&[&args[..cut], &["-o", "5432"]].concat(), "nft");
        assert_eq!(nat, want, "{name}");
        assert!(nat.contains("--dport 5432 -j RETURN"), "{nat}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The image as `istio-validation` (Istio CNI on), run as the template runs it: UID 1337, no
/// capability, a read-only root, the injector's validation arguments verbatim. It passes where
/// the rules are in place and exits 126 with its explanation where they are not.
#[test]
fn image_validates_as_the_istio_validation_container() {
    let test = "image_validates_as_the_istio_validation_container";
    let Some(img) = image(test) else { return };
    let Some(all) = injected_args() else { return };
    let init: Vec<&str> = all[0].iter().map(String::as_str).collect();
    let validation: Vec<&str> = all[1].iter().map(String::as_str).collect();
    assert!(validation.ends_with(&["--run-validation", "--skip-rule-apply"]));

    let ns = Netns::new("imgvalid");
    let o = img.run(&Run::new(Caps::NetAdminRaw, Some(&ns), &init));
    assert_eq!(
        o.status.code(),
        Some(0),
        "programming the rules: {}",
        stderr(&o)
    );
    let rules = saved(&ns, "iptables-nft-save");

    let validate = |ns: &Netns, args: &[&str]| {
        let mut run = Run::new(Caps::None, Some(ns), args);
        run.opts.push("--user=1337:1337".into());
        run.opts.push("--read-only-tmpfs=false".into());
        img.run(&run)
    };
    let o = validate(&ns, &validation);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        saved(&ns, "iptables-nft-save"),
        rules,
        "validation changed the rules"
    );

    let bare = Netns::new("imgvalidbare");
    let o = validate(&bare, &[&validation[..], &["--probe-timeout=1s"]].concat());
    assert_eq!(o.status.code(), Some(126), "{}", stderr(&o));
    assert!(stderr(&o).contains("IPv4"), "{}", stderr(&o));
}

/// Every argument list Istio's injector renders reaches the entrypoint unchanged (a leading
/// `istio-iptables`, empty strings, `*`): the image's dry run equals the host binary's (same
/// exit code, same stdout), with no capabilities at all, and the user's own `my custom args`
/// override is a usage error (2).
#[test]
fn image_entrypoint_takes_every_injected_arg_list() {
    let test = "image_entrypoint_takes_every_injected_arg_list";
    let Some(img) = image(test) else { return };
    let Some(all) = injected_args() else { return };
    let reference = Netns::new("imgargs");
    let mut seen_usage_error = false;
    let mut rulesets = 0;
    for args in &all {
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        let validates = args.contains(&"--run-validation");
        args.push("--dry-run");
        if validates {
            // The probe finds no rules here either way; do not wait 5 s for it.
            args.push("--probe-timeout=1s");
        }
        let got = img.run(&Run::new(Caps::None, Some(&reference), &args));
        let want = host_run(&reference, &args);
        assert_eq!(
            got.status.code(),
            want.status.code(),
            "{args:?}\nimage: {}\nhost: {}",
            stderr(&got),
            stderr(&want)
        );
        assert_eq!(stdout(&got), stdout(&want), "{args:?}");
        if want.status.code() == Some(2) {
            seen_usage_error = true;
            assert_eq!(stderr(&got), stderr(&want), "{args:?}");
        } else {
            // A validating entry may probe even in a dry run and then fails here (126): no rules.
            let ok: &[i32] = if validates { &[0, 126] } else { &[0] };
            assert!(
                want.status.code().is_some_and(|c| ok.contains(&c)),
                "{args:?}: {}",
                stderr(&want)
            );
            if !stdout(&got).is_empty() {
                rulesets += 1;
                assert!(stdout(&got).starts_with("# IPv4"), "{args:?}");
            }
        }
    }
    assert!(seen_usage_error, "the `my custom args` entry was expected");
    // Entries with --skip-rule-apply may print nothing; the others print their ruleset.
    assert!(
        rulesets >= 10,
        "only {rulesets} argument lists printed a ruleset"
    );
}

/// Splits an Istio golden into its IPv4 and IPv6 `iptables-restore` inputs (see the conformance
/// README: a family ends where a table header repeats or goes back in order).
fn split_golden(text: &str) -> (String, String) {
    let (mut v4, mut v6) = (String::new(), String::new());
    let mut prev: Option<String> = None;
    let mut in_v6 = false;
    for line in text.lines() {
        if line == "iptables-save" || line == "ip6tables-save" {
            continue;
        }
        if let Some(table) = line.strip_prefix('*') {
            let table = table.trim().to_owned();
            if prev.as_ref().is_some_and(|p| table <= *p) {
                in_v6 = true;
            }
            prev = Some(table);
        }
        let out = if in_v6 { &mut v6 } else { &mut v4 };
        out.push_str(line);
        out.push('\n');
    }
    (v4, v6)
}

/// Renames the golden's chains (`ISTIO_X` → `G<n>_X`) so that all goldens load side by side.
fn rename_chains(text: &str, n: usize) -> String {
    text.lines()
        .map(|l| {
            l.split(' ')
                .map(|t| match t.strip_prefix("ISTIO_") {
                    Some(rest) => format!("G{n}_{rest}"),
                    None => t.to_owned(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .map(|l| l + "\n")
        .collect()
}

/// The xtables extensions in the image are enough for every ruleset Istio produces: all 27 of
/// Istio's goldens (every match and target it uses, IPv4 and IPv6) load through the image's
/// nft and legacy `*-restore`, the kernel then holds what the host's iptables loads from the
/// same text, and the image's `*-save` prints it back identically.
#[test]
fn image_loads_every_istio_golden_with_both_backends() {
    let test = "image_loads_every_istio_golden_with_both_backends";
    let Some(img) = image(test) else { return };
    let Some(dir) = util::shared_conformance() else {
        return;
    };
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir.join("istio-goldens"))
        .expect("istio-goldens")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "golden"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 27, "{names:?}");
    let (mut v4, mut v6) = (String::new(), String::new());
    for (n, path) in names.iter().enumerate() {
        let (a, b) = split_golden(&std::fs::read_to_string(path).expect("golden"));
        v4 += &rename_chains(&a, n);
        v6 += &rename_chains(&b, n);
    }
    assert!(!v6.is_empty());

    // Two goldens name groups (`java`, `ftp`): give both sides a group file that has them.
    let group = "root:x:0:\njava:x:1001:\nftp:x:1002:\nistio-proxy:x:1337:\n";
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("group-{}", std::process::id()));
    std::fs::write(&tmp, group).expect("writing group file");
    let mount = format!("--volume={}:/etc/group:ro", tmp.display());

    let mut extensions_used = BTreeSet::new();
    for backend in ["nft", "legacy"] {
        let ns = Netns::new(&format!("imggold{backend}"));
        let reference = Netns::new(&format!("imggoldref{backend}"));
        reference.etc_file("group", group);
        for (family, input) in [("iptables", &v4), ("ip6tables", &v6)] {
            let restore = format!("/usr/sbin/{family}-{backend}-restore");
            let save = format!("{family}-{backend}-save");
            let mut run = Run::new(Caps::NetAdminRaw, Some(&ns), &["--noflush"]);
            run.entrypoint = Some(&restore);
            run.opts.push(mount.clone());
            run.stdin = Some(input.clone());
            let o = img.run(&run);
            assert!(o.status.success(), "{restore} in the image: {}", stderr(&o));

            let r = reference.run_with_input(
                &[&format!("{family}-{backend}-restore"), "--noflush"],
                input,
            );
            assert!(
                r.status.success(),
                "host {family}-{backend}-restore: {}",
                stderr(&r)
            );
            let host = saved(&ns, &save);
            assert_eq!(host, saved(&reference, &save), "{family} {backend}");
            assert!(host.lines().filter(|l| l.starts_with("-A")).count() > 200);

            let save_path = format!("/usr/sbin/{save}");
            let mut run = Run::new(Caps::NetAdminRaw, Some(&ns), &[]);
            run.entrypoint = Some(&save_path);
            run.opts.push(mount.clone());
            let o = img.run(&run);
            assert!(o.status.success(), "{save} in the image: {}", stderr(&o));
            let printed = util::normalized_save(&stdout(&o));
            assert_eq!(printed, host, "{save} in the image vs the host");
            for l in host.lines() {
                let mut words = l.split(' ');
                while let Some(w) = words.next() {
                    if w == "-m" || w == "-j" {
                        extensions_used.insert(words.next().unwrap_or_default().to_owned());
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_file(&tmp);
    // The goldens really exercise what the image ships (see image/build.sh).
    for ext in [
        "REDIRECT",
        "TPROXY",
        "MARK",
        "CONNMARK",
        "CT",
        "RETURN",
        "ACCEPT",
        "tcp",
        "udp",
        "multiport",
        "owner",
        "conntrack",
        "mark",
        "connmark",
    ] {
        assert!(
            extensions_used.contains(ext),
            "{ext} not covered: {extensions_used:?}"
        );
    }
}
