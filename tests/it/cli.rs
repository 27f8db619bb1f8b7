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
