//! The binary as a user runs it: dry-run output on stdout, logs and errors on stderr,
//! exit codes.

use crate::util::{istio_init, output, stderr, stdout};

#[test]
fn dry_run_prints_only_the_ruleset_on_stdout() {
    let o = output(istio_init().args(["--dry-run", "--ipv6=false"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("# IPv4"), "{out}");
    assert!(out.lines().skip(1).all(|l| !l.starts_with('#')), "{out}");
    assert!(
        out.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n"),
        "{out}"
    );
    assert!(stderr(&o).contains("Istio config:"), "{}", stderr(&o));
}

#[test]
fn bad_value_exits_2_with_one_line() {
    let o = output(istio_init().args(["-n", "-d", "80x"]));
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "error: invalid port \"80x\" in --istio-local-exclude-ports (-d): not a number\n"
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn user_override_args_are_a_usage_error() {
    let o = output(istio_init().args(["my", "custom", "args"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("my"), "{}", stderr(&o));
}

/// With `--netns`, a dry run (and `explain`) describes the target namespace: IPv6 rules appear
/// exactly when that namespace has a global IPv6 address, whatever the caller's namespace has.
#[test]
fn dry_run_with_netns_reads_the_target_namespace() {
    use crate::util::{Netns, privileged, veth};
    if !privileged("dry_run_with_netns_reads_the_target_namespace") {
        return;
    }
    let (v4_only, dual, peer) = (Netns::new("v4only"), Netns::new("dual"), Netns::new("peer"));
    veth(&v4_only, &["198.18.10.1/24"], &peer, &["198.18.10.2/24"]);
    veth(
        &dual,
        &["198.18.11.1/24", "2001:db8:11::1/64"],
        &peer,
        &["198.18.11.2/24"],
    );
    for (ns, want_v6) in [(&v4_only, false), (&dual, true)] {
        let path = ns.path();
        let o = output(istio_init().args(["--dry-run", "--netns"]).arg(&path));
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o).contains("# IPv6"), want_v6, "{}", ns.name);
        assert!(stdout(&o).starts_with("# IPv4"));
        let o = output(istio_init().args(["explain", "--netns"]).arg(&path));
        assert!(o.status.success(), "{}", stderr(&o));
        let rules_for = if want_v6 {
            "Rules for IPv4 and IPv6."
        } else {
            "Rules for IPv4 only."
        };
        assert!(stdout(&o).contains(rules_for), "{}", stdout(&o));
        // Nothing was programmed: a dry run only reads.
        assert!(!ns.ok(&["iptables-save"]).contains("ISTIO"));
    }
}

/// The binary starts at glibc's `main`, not std's runtime start (src/main.rs), so it checks
/// the standard descriptors itself: started with all three closed, a real nftables-mode run
/// has `/dev/null` on 0, 1 and 2 (seen while it waits for the namespace lock the test holds;
/// unchecked, the namespace file and the sockets it opens would take them, and its log lines
/// would be written there), then applies exactly the rules it applies normally.
#[test]
fn a_run_with_its_standard_descriptors_closed_has_dev_null_on_them() {
    use crate::faults::istio_init_cmd;
    use crate::nft_mode::nft_state;
    use std::time::{Duration, Instant};
    let Some((_dir, args, full, ns)) =
        nft_sidecar_case("a_run_with_its_standard_descriptors_closed", "fds")
    else {
        return;
    };
    // The namespace lock, held as another run holds it (its abstract socket bound in the
    // namespace), but close-on-exec so that the process under test does not inherit it.
    let lock = crate::util::in_netns(&ns, || {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};
        let name = istio_init::sys::guard::LOCK_NAME;
        let sock = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let addr = UnixAddr::new_abstract(name.as_bytes()).unwrap();
        bind(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr).unwrap();
        sock
    });
    // The command the tests run istio-init with, through a shell that closes 0, 1 and 2.
    let cmd = istio_init_cmd(&ns, &args, &[]);
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec \"$@\" <&- >&- 2>&-")
        .arg("sh")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .spawn()
        .expect("running istio-init with closed descriptors");
    let fd = |n: u32| std::fs::read_link(format!("/proc/{}/fd/{n}", child.id())).ok();
    // istio-init waiting for the lock (the shell has become istio-init, and its namespace
    // file and lock socket are open: descriptors 3 and 4).
    // Whether a descriptor is close-on-exec (`flags:` of fdinfo, octal; O_CLOEXEC 02000000).
    let cloexec = |n: u32| {
        let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/{n}", child.id()));
        info.ok().and_then(|i| {
            let flags = i.lines().find_map(|l| l.strip_prefix("flags:"))?;
            Some(u32::from_str_radix(flags.trim(), 8).ok()? & 0o2_000_000 != 0)
        })
    };
    let started = Instant::now();
    let (mut seen, mut inherited);
    loop {
        let exe = std::fs::read_link(format!("/proc/{}/exe", child.id())).ok();
        seen = [fd(0), fd(1), fd(2), fd(3), fd(4)];
        inherited = (0..3).map(cloexec).collect::<Vec<_>>();
        let waiting = exe.is_some_and(|e| e.ends_with("istio-init")) && seen[4].is_some();
        if waiting || started.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(lock);
    let status = child.wait().expect("waiting for istio-init");
    for (n, link) in seen.iter().take(3).enumerate() {
        assert_eq!(
            link.as_deref(),
            Some(std::path::Path::new("/dev/null")),
            "descriptor {n}: {seen:?}"
        );
    }
    // Not close-on-exec: a program istio-init starts or becomes inherits them.
    assert_eq!(inherited, [Some(false); 3], "{seen:?}");
    assert!(status.success(), "{status:?}");
    assert_eq!(nft_state(&ns), full);
}

/// `SIGPIPE` is ignored (src/main.rs does what std's runtime start would): a run whose
/// stderr is a pipe nobody reads any more loses its log lines but still applies its rules
/// and exits 0, instead of dying of `SIGPIPE` at its first log line.
#[test]
fn a_run_whose_log_pipe_is_closed_still_applies_its_rules() {
    use crate::faults::istio_init_cmd;
    use crate::nft_mode::nft_state;
    let Some((_dir, args, full, ns)) = nft_sidecar_case("a_run_whose_log_pipe_is_closed", "pipe")
    else {
        return;
    };
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let status = istio_init_cmd(&ns, &args, &[])
        .stderr(std::process::Stdio::from(write))
        .status()
        .expect("running istio-init");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(nft_state(&ns), full);
}

/// For test `test` (None when nftables tests cannot run here, which `ready` reports): the
/// standard sidecar arguments in nftables mode, the state a clean run of them leaves (applied
/// in a reference namespace), and a fresh pod namespace; the first item keeps the
/// resolv.conf the arguments name.
fn nft_sidecar_case(
    test: &str,
    tag: &str,
) -> Option<(
    crate::util::ShimDir,
    Vec<String>,
    crate::nft_mode::NftState,
    crate::util::Netns,
)> {
    use crate::nft_mode::{ready, reference, sidecar};
    if !ready(test) {
        return None;
    }
    let (dir, resolv) = crate::faults::resolv_dir(&format!("{tag}resolv"));
    let args = sidecar(&resolv, true);
    let (_, full) = reference(&format!("{tag}ref"), &args);
    Some((dir, args, full, crate::faults::pod(&format!("{tag}pod"))))
}

/// README "Differences from Istio": `DRY_RUN_FILE_PATH` receives the dry-run text, appended
/// run after run.
#[test]
fn dry_run_file_path_receives_the_dry_run_text_appended() {
    let tmp = crate::util::TempDir::new("dryrunfile");
    let file = tmp.path().join("dry-run.txt");
    let mut texts = String::new();
    for _ in 0..2 {
        let o = output(
            istio_init()
                .args(["--dry-run", "--ipv6=false"])
                .env("DRY_RUN_FILE_PATH", &file),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        texts.push_str(&stdout(&o));
    }
    assert!(texts.contains("ISTIO_OUTPUT"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), texts);
}

/// A run whose output cannot be written fails: stdout on `/dev/full` gives exit 1 and an
/// error on stderr (never exit 0 with the output lost), for a dry run, `explain`, `trace`
/// and `--help`.
#[test]
fn unwritable_stdout_fails_the_run() {
    for args in [
        &["--dry-run", "--ipv6=false"][..],
        &["explain", "--ipv6=false"],
        &["trace", "out", "198.18.0.9:80", "--ipv6=false"],
        &["--help"],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let o = output(istio_init().args(args).stdout(full));
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("error: "), "{args:?}: {}", stderr(&o));
    }
}

/// Found by the differential test: an IPv4-only ruleset whose resolv.conf lists only IPv6
/// nameservers keeps Istio's DNS rules that name no address (the `! --dport 53` exceptions,
/// the raw table's conntrack zones), and none naming the IPv6 server.
#[test]
fn ipv4_only_dns_capture_with_only_ipv6_nameservers_keeps_the_address_free_dns_rules() {
    let tmp = crate::util::TempDir::new("v6resolv");
    let resolv = tmp.file("resolv.conf", "nameserver 2001:db8::53\n");
    let o = output(
        istio_init()
            .args(["--dry-run", "--ipv6=false", "--redirect-dns"])
            .arg(format!("--resolv-conf={}", resolv.display())),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("! --dport 53 -m owner ! --uid-owner 1337 -j RETURN"),
        "{out}"
    );
    assert!(
        out.contains("* raw") && out.contains("-j CT --zone 1"),
        "{out}"
    );
    assert!(!out.contains("2001:db8::53"), "{out}");
}
