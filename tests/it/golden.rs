//! Golden rulesets: for each case in `tests/golden/<case>/` (inputs `args`, `env`, optional
//! `resolv.conf`), the dry-run output of the binary must equal `ipv4.rules` / `ipv6.rules`.
//!
//! The cases are Istio's 27 capture scenarios. The expected files are this project's own output,
//! recorded once it was shown equal to Istio's goldens in the kernel (see `conformance.rs`), so a
//! clone without `../shared` still tests them. `UPDATE_GOLDEN=1 cargo test` rewrites them;
//! review the diff like code.

use std::path::{Path, PathBuf};

use crate::util::{istio_init, output, stderr, stdout};

pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// A golden case's inputs.
#[derive(Debug)]
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(golden_dir()).expect("tests/golden") {
        let dir = entry.expect("dir entry").path();
        if !dir.is_dir() {
            continue;
        }
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let args = read("args")
            .lines()
            .skip_while(|l| l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        let env = read("env")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("KEY=value");
                (k.to_owned(), v.to_owned())
            })
            .collect();
        out.push(Case {
            name: dir.file_name().unwrap().to_string_lossy().into_owned(),
            dir,
            args,
            env,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Runs the binary's dry run for a case and returns the restore text per family
/// (`[ipv4, ipv6]`, the second empty when IPv6 is off).
pub fn dry_run(case: &Case) -> [String; 2] {
    let mut cmd = istio_init();
    cmd.args(&case.args).arg("--dry-run");
    let resolv = case.dir.join("resolv.conf");
    let resolv = if resolv.is_file() {
        resolv
    } else {
        PathBuf::from("/nonexistent/resolv.conf")
    };
    cmd.arg(format!("--resolv-conf={}", resolv.display()));
    for (k, v) in &case.env {
        cmd.env(k, v);
    }
    let o = output(&mut cmd);
    assert!(o.status.success(), "{}: {}", case.name, stderr(&o));
    split_families(&stdout(&o))
}

/// Splits dry-run output at its `# IPv4` / `# IPv6` header lines.
pub fn split_families(text: &str) -> [String; 2] {
    let mut parts = [String::new(), String::new()];
    let mut cur: Option<usize> = None;
    for line in text.lines() {
        if line.starts_with("# IPv4") {
            cur = Some(0);
        } else if line.starts_with("# IPv6") {
            cur = Some(1);
        } else if let Some(i) = cur {
            parts[i].push_str(line);
            parts[i].push('\n');
        } else {
            panic!("dry-run output does not start with a family header: {line:?}");
        }
    }
    parts
}

/// A readable diff of two texts, line by line.
pub fn diff(want: &str, got: &str) -> String {
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let mut out = String::new();
    for i in 0..w.len().max(g.len()) {
        let (a, b) = (w.get(i).copied(), g.get(i).copied());
        if a != b {
            out.push_str(&format!(
                "line {}:\n  want: {}\n  got:  {}\n",
                i + 1,
                a.unwrap_or("<none>"),
                b.unwrap_or("<none>")
            ));
        }
    }
    out
}

#[test]
fn golden_rulesets() {
    let cases = cases();
    assert_eq!(cases.len(), 27, "expected Istio's 27 capture scenarios");
    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let mut failures = Vec::new();
    for case in &cases {
        let got = dry_run(case);
        for (i, file) in ["ipv4.rules", "ipv6.rules"].iter().enumerate() {
            let path = case.dir.join(file);
            if update {
                if got[i].is_empty() {
                    let _ = std::fs::remove_file(&path);
                } else {
                    std::fs::write(&path, &got[i]).expect("writing golden");
                }
                continue;
            }
            let want = std::fs::read_to_string(&path).unwrap_or_default();
            if want != got[i] {
                failures.push(format!("{}/{file}:\n{}", case.name, diff(&want, &got[i])));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "golden mismatches:\n{}",
        failures.join("\n")
    );
}
