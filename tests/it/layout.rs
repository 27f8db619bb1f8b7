//! The pure core stays pure: these modules must not read env vars, files or the clock, spawn
//! processes or make syscalls (house style §4.1). A cheap textual check, kept honest by
//! listing the modules explicitly.

use std::path::Path;

/// Modules that must do no I/O.
const PURE: &[&str] = &[
    "settings/cli.rs",
    "settings/config.rs",
    "net.rs",
    "capture/mod.rs",
    "capture/build.rs",
    "backend/iptables/render.rs",
    "exit.rs",
    "settings/annotations.rs",
    "settings/source.rs",
    "settings/mod.rs",
    "explain.rs",
    "trace.rs",
    "backend/iptables/state.rs",
    "backend/nftables/map.rs",
    "nft/mod.rs",
];

/// Paths whose use means an effect.
const EFFECTS: &[&str] = &[
    "std::fs",
    "std::process",
    "std::env::var",
    "std::env::args",
    "std::time::SystemTime",
    "std::time::Instant",
    "std::io::stdout",
    "std::net::Tcp",
    "std::net::Udp",
    "nix::",
    "caps::",
    "println!",
];

#[test]
fn pure_modules_do_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for module in PURE {
        let text = std::fs::read_to_string(src.join(module)).expect("reading module");
        for effect in EFFECTS {
            // A path starts the match (`nix::` must not match `std::os::unix::`).
            let used = text.match_indices(effect).any(|(at, _)| {
                !text[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_')
            });
            assert!(!used, "src/{module} uses {effect}: it must stay pure");
        }
        assert!(
            text.starts_with("//!"),
            "src/{module} must start with a //! paragraph"
        );
    }
}

/// The modules of `src/` (`a/b.rs` and `a/b/mod.rs` are `a::b`) and the modules each one names
/// through `crate::` or `super::` outside its tests.
fn module_graph() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    use std::collections::{BTreeMap, BTreeSet};
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).expect("reading src") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src").with_extension("");
        let mut name = rel.to_string_lossy().replace('/', "::");
        if let Some(parent) = name.strip_suffix("::mod") {
            name = parent.to_owned();
        }
        if name == "lib" || name == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("reading module");
        let code = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .to_owned();
        texts.insert(name, code);
    }
    let names: BTreeSet<String> = texts.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (name, code) in &texts {
        let parent: Vec<&str> = name.split("::").collect();
        let mut deps = BTreeSet::new();
        let mut paths: Vec<Vec<String>> = Vec::new();
        for (prefix, base) in [
            ("crate::", Vec::new()),
            ("super::", parent[..parent.len() - 1].to_vec()),
        ] {
            for (at, _) in code.match_indices(prefix) {
                let rest: String = code[at + prefix.len()..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let mut p: Vec<String> = base.iter().map(|s| (*s).to_owned()).collect();
                p.extend(
                    rest.split("::")
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
                paths.push(p);
            }
        }
        for p in paths {
            // The longest prefix that is a module; a module's own ancestors do not count
            // (a child may use what its parent declares).
            if let Some(m) = (1..=p.len())
                .rev()
                .map(|k| p[..k].join("::"))
                .find(|m| names.contains(m))
            {
                if &m != name && !name.starts_with(&format!("{m}::")) {
                    deps.insert(m);
                }
            }
        }
        graph.insert(name.clone(), deps);
    }
    graph
}

#[test]
fn no_import_cycle_between_modules() {
    let graph = module_graph();
    assert!(graph.contains_key("capture") && graph.contains_key("backend::nftables"));
    // Depth-first search with colours: a grey module reached again closes a cycle.
    fn visit(
        m: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        colour: &mut std::collections::BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        colour.insert(m.to_owned(), 1);
        stack.push(m.to_owned());
        for d in graph.get(m).into_iter().flatten() {
            match colour.get(d).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == d).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(d.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(d, graph, colour, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        colour.insert(m.to_owned(), 2);
        None
    }
    let mut colour = std::collections::BTreeMap::new();
    for m in graph.keys() {
        if colour.get(m).copied().unwrap_or(0) == 0 {
            if let Some(cycle) = visit(m, &graph, &mut colour, &mut Vec::new()) {
                panic!("import cycle: {}", cycle.join(" -> "));
            }
        }
    }
}

#[test]
fn every_folder_says_what_it_owns() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for e in std::fs::read_dir(&src).expect("reading src") {
        let dir = e.expect("dir entry").path();
        if !dir.is_dir() {
            continue;
        }
        let text = std::fs::read_to_string(dir.join("mod.rs"))
            .unwrap_or_else(|e| panic!("{}/mod.rs: {e}", dir.display()));
        let first = text.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("//! ") && first.len() > 20,
            "{}/mod.rs must open with a //! line saying what the folder owns",
            dir.display()
        );
    }
}
