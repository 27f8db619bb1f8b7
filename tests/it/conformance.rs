//! Conformance with Istio, read from `../shared/conformance` (absent: skipped locally, a
//! failure under `CI=true`):
//! - every one of Istio's 27 golden rulesets equals ours in the kernel: both are loaded with
//!   `iptables-restore --noflush` into fresh network namespaces (nft and legacy backends) and
//!   `iptables-save` is compared chain by chain, in order;
//! - the texts are also byte-identical once addresses are written canonically;
//! - every argument list the sidecar injector renders parses and dry-runs.

use std::path::Path;

use crate::golden::{Case, cases, diff, dry_run};
use crate::util::{Netns, istio_init, output, privileged, shared_conformance, stderr, stdout};

/// Splits an Istio golden transcript into its IPv4 and IPv6 restore inputs. The `*-save`
/// command lines are dropped; a family ends where a table header repeats or goes back in
/// alphabetical order.
fn istio_golden(dir: &Path, name: &str) -> [String; 2] {
    let text = std::fs::read_to_string(dir.join("istio-goldens").join(format!("{name}.golden")))
        .unwrap_or_else(|e| panic!("reading golden {name}: {e}"));
    let mut parts = [String::new(), String::new()];
    let mut family = 0;
    let mut last_table = String::new();
    for line in text.lines() {
        if line == "iptables-save" || line == "ip6tables-save" {
            continue;
        }
        if let Some(table) = line.strip_prefix("* ") {
            if !last_table.is_empty() && table <= last_table.as_str() {
                family += 1;
            }
            last_table = table.to_owned();
        }
        assert!(family < 2, "{name}: more than two families");
        parts[family].push_str(line);
        parts[family].push('\n');
    }
    parts
}

/// Rewrites every address or prefix token in canonical form (`::127.0.0.53` → `::7f00:35`).
fn canonical_addresses(text: &str) -> String {
    text.lines()
        .map(|line| {
            line.split(' ')
                .map(|tok| {
                    let (addr, suffix) = tok.split_once('/').unwrap_or((tok, ""));
                    match addr.parse::<std::net::IpAddr>() {
                        Ok(ip) if suffix.is_empty() => ip.to_string(),
                        Ok(ip) => format!("{ip}/{suffix}"),
                        Err(_) => tok.to_owned(),
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .map(|l| l + "\n")
        .collect()
}

fn shared_cases() -> Option<(std::path::PathBuf, Vec<Case>)> {
    let dir = shared_conformance()?;
    let cases = cases();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let names: Vec<&str> = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 27);
    for n in &names {
        assert!(
            cases.iter().any(|c| c.name == *n),
            "shared case {n} has no tests/golden/{n}"
        );
    }
    Some((dir, cases))
}

#[test]
fn text_matches_istio_goldens() {
    let Some((dir, cases)) = shared_cases() else {
        return;
    };
    let mut failures = Vec::new();
    for case in &cases {
        let want = istio_golden(&dir, &case.name);
        let got = dry_run(case);
        for fam in 0..2 {
            let (w, g) = (
                canonical_addresses(&want[fam]),
                canonical_addresses(&got[fam]),
            );
            if w != g {
                failures.push(format!("{} family {fam}:\n{}", case.name, diff(&w, &g)));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Group names used by the owner-group cases, resolvable inside the test namespaces.
const GROUP_FILE: &str = "root:x:0:\njava:x:1001:\nftp:x:1002:\n";

/// Loads one family's text into a namespace and returns the normalised save output.
fn load_and_save(ns: &Netns, backend: &str, v6: bool, text: &str) -> String {
    let p = if v6 { "ip6tables" } else { "iptables" };
    let restore = format!("{p}-{backend}-restore");
    let o = ns.run_with_input(&[&restore, "--noflush"], text);
    assert!(
        o.status.success(),
        "{restore} in {} failed: {}\ninput:\n{text}",
        ns.name,
        stderr(&o)
    );
    ns.save(&format!("{p}-{backend}-save"))
}

#[test]
fn kernel_state_matches_istio_goldens() {
    if !privileged("kernel_state_matches_istio_goldens") {
        return;
    }
    let Some((dir, cases)) = shared_cases() else {
        return;
    };
    let mut failures = Vec::new();
    let mut compared = 0;
    for backend in ["nft", "legacy"] {
        for case in &cases {
            let want = istio_golden(&dir, &case.name);
            let got = dry_run(case);
            let (theirs, ours) = (Netns::new("istio"), Netns::new("ours"));
            for ns in [&theirs, &ours] {
                ns.etc_file("group", GROUP_FILE);
            }
            for fam in 0..2 {
                assert_eq!(
                    want[fam].is_empty(),
                    got[fam].is_empty(),
                    "{}: family {fam} presence differs",
                    case.name
                );
                if want[fam].is_empty() {
                    continue;
                }
                let a = load_and_save(&theirs, backend, fam == 1, &want[fam]);
                let b = load_and_save(&ours, backend, fam == 1, &got[fam]);
                assert!(a.contains("ISTIO_"), "{}: nothing loaded", case.name);
                compared += 1;
                if a != b {
                    failures.push(format!(
                        "{} ({backend}, family {fam}):\n{}",
                        case.name,
                        diff(&a, &b)
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // 27 cases, 11 of them with IPv6, on two backends.
    assert_eq!(compared, 2 * (27 + 11));
}

#[test]
fn injected_argument_lists_parse_and_dry_run() {
    let Some(dir) = shared_conformance() else {
        return;
    };
    let lists: Vec<Vec<String>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("injected-args.json")).unwrap())
            .unwrap();
    assert_eq!(lists.len(), 19);
    assert_eq!(
        lists[0],
        istio_init::settings::cli::INJECTOR_DEFAULT_ARGS,
        "cli::INJECTOR_DEFAULT_ARGS is not the injector's default list"
    );
    let mut seen_override = false;
    for args in &lists {
        let o = output(istio_init().args(args).args(["--dry-run", "--ipv6=false"]));
        if args.first().map(String::as_str) != Some("istio-iptables") {
            // The user's own container override (`my custom args`) is not ours to accept.
            seen_override = true;
            assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
            assert!(
                stderr(&o).contains("unrecognized subcommand 'my'"),
                "{}",
                stderr(&o)
            );
            assert!(o.stdout.is_empty());
            continue;
        }
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(out.starts_with("# IPv4"), "{args:?}: {out}");
        // What the arguments ask for is what the ruleset does.
        let value = |flag: &str| &args[args.iter().position(|a| a == flag).unwrap() + 1];
        if value("-b") == "*" {
            for port in value("-d").split(',') {
                let rule = format!("-p tcp --dport {port} -j RETURN");
                assert!(out.contains(&rule), "{args:?}: missing {rule}");
            }
        }
        let uid = value("-u");
        assert!(out.contains(&format!("-m owner --uid-owner {uid} -j RETURN")));
        let tproxy = args.contains(&"TPROXY".to_owned());
        assert_eq!(out.contains("-j TPROXY"), tproxy, "{args:?}");
    }
    assert!(seen_override);
}
