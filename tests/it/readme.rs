//! The compatibility table of `docs/cli.md` is generated from the CLI definition and checked here, so
//! the two cannot drift. `UPDATE_README=1 cargo test readme` rewrites the table in place.

use std::path::Path;

use istio_init::settings::cli::{self, Kind, OPTIONS, Origin};

const BEGIN: &str = "<!-- compat-table:begin -->";
const END: &str = "<!-- compat-table:end -->";

fn cell(s: &str) -> String {
    if s.is_empty() {
        "`\"\"`".to_owned()
    } else {
        format!("`{}`", s.replace('|', "\\|"))
    }
}

fn table() -> String {
    let command = cli::command();
    let mut out = String::from(
        "| flag | short | env vars (later wins) | default | default after `istio-iptables` | status |\n\
         |---|---|---|---|---|---|\n",
    );
    for o in OPTIONS {
        // Every row is a real clap argument with the same short letter.
        let arg = command
            .get_arguments()
            .find(|a| a.get_id() == o.long)
            .unwrap_or_else(|| panic!("--{} is in OPTIONS but not in the clap command", o.long));
        assert_eq!(arg.get_short(), o.short, "--{}", o.long);
        assert_eq!(arg.get_long(), Some(o.long));
        let status = match (o.origin, o.unimplemented) {
            (_, true) => "accepted; exits 2 (not implemented)",
            (Origin::Istio, false) => "supported",
            (Origin::Logging, false) if matches!(o.long, "log_output_level" | "log_as_json") => {
                "supported"
            }
            (Origin::Logging, false) => "accepted, ignored",
            (Origin::Extension, false) => "istio-init extension",
        };
        let flag = match o.kind {
            Kind::Bool => format!("`--{}[=BOOL]`", o.long),
            Kind::Value => format!("`--{}`", o.long),
        };
        out.push_str(&format!(
            "| {flag} | {} | {} | {} | {} | {status} |\n",
            o.short.map(|s| format!("`-{s}`")).unwrap_or_default(),
            o.env
                .iter()
                .map(|e| format!("`{e}`"))
                .collect::<Vec<_>>()
                .join(", "),
            cell(o.native_default),
            cell(o.istio_default),
        ));
    }
    for e in cli::ENV_ONLY {
        out.push_str(&format!(
            "| (env only) | | `{}` | {} | {} | supported |\n",
            e.name,
            cell(e.default),
            cell(e.default)
        ));
    }
    // Nothing in the clap command is missing from the table (help and version aside).
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        assert!(
            matches!(id, "help" | "version") || OPTIONS.iter().any(|o| o.long == id),
            "clap argument {id} is not documented in OPTIONS"
        );
    }
    out
}

#[test]
fn readme_compatibility_table_matches_the_cli() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/cli.md");
    let readme = std::fs::read_to_string(&path).expect("docs/cli.md");
    let (head, rest) = readme
        .split_once(BEGIN)
        .expect("docs/cli.md has the table begin marker");
    let (current, tail) = rest
        .split_once(END)
        .expect("docs/cli.md has the table end marker");
    let want = format!("\n{}", table());
    if std::env::var("UPDATE_README").is_ok_and(|v| v == "1") {
        std::fs::write(&path, format!("{head}{BEGIN}{want}{END}{tail}"))
            .expect("writing docs/cli.md");
        return;
    }
    assert_eq!(
        current, want,
        "the compatibility table of docs/cli.md is stale: run UPDATE_README=1 cargo test readme"
    );
}

#[test]
fn help_lists_every_flag_with_env_and_default() {
    let help = cli::command().render_long_help().to_string();
    for o in OPTIONS {
        assert!(
            help.contains(&format!("--{}", o.long)),
            "--{} missing from --help",
            o.long
        );
        for e in o.env {
            assert!(
                help.contains(e),
                "env {e} of --{} missing from --help",
                o.long
            );
        }
        if !o.native_default.is_empty() {
            assert!(
                help.contains(o.native_default),
                "default of --{} missing",
                o.long
            );
        }
    }
}
