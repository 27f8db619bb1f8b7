//! `--native-nftables` end to end, against Istio's 28 nftables goldens (read from
//! `../shared/conformance`; absent: skipped locally, a failure under `CI=true`). For every case
//! the real binary applies its configuration in one fresh namespace, `nft -f` of Istio's golden
//! runs in another, and `nft -f` of our own dry run in a third: the three `nft list ruleset`
//! listings must be equal (counter values aside), and so must the two `--debug=netlink`
//! listings of ours and Istio's (expression by expression). A re-run converges to the same
//! ruleset, and `--cleanup-only` leaves nothing.

use crate::nftables::{debug_listing, listing, nft_f};
use crate::util::{Netns, TempDir, assert_ok, privileged, shared_conformance, stdout, which};

/// Group names the owner-group cases use, resolvable inside the test namespaces.
pub const GROUP_FILE: &str = "root:x:0:\njava:x:1001:\nftp:x:1002:\n";

/// One case of `nft-cases.json`: the arguments (base arguments first), env vars, whether the
/// namespace has IPv6 and its nameservers.
#[derive(Debug)]
pub struct NftCase {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub ipv6: bool,
    pub dns: Vec<String>,
}

pub fn nft_cases() -> Option<(std::path::PathBuf, Vec<NftCase>)> {
    let dir = shared_conformance()?;
    let text = std::fs::read_to_string(dir.join("nft-cases.json")).expect("nft-cases.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("nft-cases.json");
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let base = strings(&json["base_args"]);
    let cases: Vec<NftCase> = json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| NftCase {
            name: c["name"].as_str().unwrap().to_owned(),
            args: base.iter().cloned().chain(strings(&c["args"])).collect(),
            env: c["env"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
            ipv6: c["ipv6"].as_bool().unwrap_or(false),
            dns: strings(&c["dns_servers"]),
        })
        .collect();
    assert_eq!(cases.len(), 28, "nft-cases.json lists 28 cases");
    Some((dir, cases))
}

impl NftCase {
    /// The arguments of a run in `--native-nftables` mode, with the case's facts made explicit.
    pub fn argv(&self, tmp: &TempDir, extra: &[&str]) -> Vec<String> {
        let resolv: String = self
            .dns
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect();
        let resolv = tmp.file(&format!("{}.resolv.conf", self.name), resolv);
        let mut v: Vec<String> = vec!["istio-iptables".into()];
        v.extend(self.args.iter().cloned());
        v.push("--native-nftables".into());
        v.push(format!("--ipv6={}", self.ipv6));
        v.push(format!("--resolv-conf={}", resolv.display()));
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    }

    pub fn run(&self, ns: &Netns, tmp: &TempDir, extra: &[&str]) -> std::process::Output {
        let argv = self.argv(tmp, extra);
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        ns.istio_init(&args, &env)
    }
}

fn ready(test: &str) -> bool {
    if !privileged(test) {
        return false;
    }
    if which("nft").is_none() {
        let msg = format!("{test}: `nft` is not installed (scripts/test.sh installs nftables)");
        assert!(!crate::util::in_ci(), "{msg}");
        eprintln!("skipped: {msg}");
        return false;
    }
    true
}

#[test]
fn native_nftables_equals_istio_goldens_in_the_kernel() {
    if !ready("native_nftables_equals_istio_goldens_in_the_kernel") {
        return;
    }
    let Some((dir, cases)) = nft_cases() else {
        return;
    };
    let tmp = TempDir::new("nftmode");
    let mut failures = Vec::new();
    for case in &cases {
        let golden = std::fs::read_to_string(
            dir.join("istio-nft-goldens")
                .join(format!("{}.golden", case.name)),
        )
        .expect("golden");
        let (ours, theirs, text) = (Netns::new("ours"), Netns::new("istio"), Netns::new("text"));
        for ns in [&ours, &theirs, &text] {
            ns.etc_file("group", GROUP_FILE);
        }
        let o = case.run(&ours, &tmp, &[]);
        assert_ok(&o);
        nft_f(&theirs, &golden);
        let dry = case.run(&text, &tmp, &["--dry-run"]);
        assert_ok(&dry);
        nft_f(&text, &stdout(&dry));
        let want = listing(&theirs);
        for (what, got) in [("apply", listing(&ours)), ("dry-run text", listing(&text))] {
            if got != want {
                failures.push(format!(
                    "{} ({what}):\n{}",
                    case.name,
                    crate::golden::diff(&want, &got)
                ));
            }
        }
        let (w, g) = (debug_listing(&theirs), debug_listing(&ours));
        if w != g {
            failures.push(format!(
                "{} (--debug=netlink):\n{}",
                case.name,
                crate::golden::diff(&w, &g)
            ));
        }
        // A re-run converges to the same ruleset; cleanup leaves nothing of ours.
        assert_ok(&case.run(&ours, &tmp, &[]));
        if listing(&ours) != want {
            failures.push(format!("{}: a re-run changed the ruleset", case.name));
        }
        assert_ok(&case.run(&ours, &tmp, &["--cleanup-only"]));
        let left = listing(&ours);
        if left.contains("istio") {
            failures.push(format!("{}: --cleanup-only left:\n{left}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
