//! The Kubernetes recipes are checked, not just written: every YAML block in `docs/kubernetes.md`
//! and `image/README.md` loads (templates embedded as strings too), every `args:` list in them is
//! one Istio's sidecar injector renders (`injected-args.json`), optionally followed by this
//! tool's `--annotations FILE` pointing into a mounted `istio-podinfo` volume, and the values
//! they tell users to set agree with the facts the recipes rest on (kubernetes-facts.md).

use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

use crate::util;

const DOCS: &[&str] = &["docs/kubernetes.md", "image/README.md"];

/// The ```yaml blocks of a Markdown text, with the line each starts on.
fn yaml_blocks(md: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in md.lines().enumerate() {
        match &mut current {
            None if line.trim_start() == "```yaml" => current = Some((n + 1, String::new())),
            None => {}
            Some(_) if line.trim_start() == "```" => blocks.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    assert!(current.is_none(), "unterminated ```yaml block");
    blocks
}

/// One container-like mapping (`name` + `args` or `image`) found in a recipe.
#[derive(Debug)]
pub struct Container {
    pub at: String,
    pub name: String,
    pub args: Option<Vec<String>>,
    pub image: Option<String>,
    pub y: Yaml,
}

#[derive(Debug, Default)]
pub struct Found {
    pub containers: Vec<Container>,
    /// Every `global.proxy_init.image` value.
    init_images: Vec<(String, String)>,
    /// `(where, spec.components.cni.enabled)` of every IstioOperator.
    operators: Vec<(String, Option<bool>)>,
}

fn strings(y: &Yaml, at: &str) -> Vec<String> {
    let Yaml::Array(items) = y else {
        panic!("{at}: not a list: {y:?}")
    };
    items
        .iter()
        .map(|i| match i {
            Yaml::String(s) => s.clone(),
            other => panic!("{at}: {other:?} is not a string (Kubernetes needs strings here)"),
        })
        .collect()
}

fn walk(y: &Yaml, at: &str, found: &mut Found) {
    match y {
        Yaml::Hash(h) => {
            if y["kind"].as_str() == Some("IstioOperator") {
                let cni = y["spec"]["components"]["cni"]["enabled"].as_bool();
                found.operators.push((at.to_owned(), cni));
            }
            if let (Some(name), true) = (
                y["name"].as_str(),
                h.contains_key(&Yaml::String("args".into()))
                    || h.contains_key(&Yaml::String("image".into())),
            ) {
                found.containers.push(Container {
                    at: at.to_owned(),
                    name: name.to_owned(),
                    args: h
                        .get(&Yaml::String("args".into()))
                        .map(|a| strings(a, &format!("{at}.args"))),
                    image: y["image"].as_str().map(str::to_owned),
                    y: y.clone(),
                });
            }
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                let here = format!("{at}.{key}");
                if key == "proxy_init" {
                    let image = v["image"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{here}.image is not a string"));
                    found.init_images.push((here.clone(), image.to_owned()));
                }
                if key == "templates" {
                    // Istio injection templates are YAML held in strings: load those too.
                    let Yaml::Hash(templates) = v else {
                        panic!("{here}: not a mapping")
                    };
                    for (name, text) in templates {
                        let name = name.as_str().unwrap_or("?");
                        let text = text
                            .as_str()
                            .unwrap_or_else(|| panic!("{here}.{name}: not a string"));
                        let docs = YamlLoader::load_from_str(text)
                            .unwrap_or_else(|e| panic!("{here}.{name}: invalid YAML: {e}"));
                        assert!(!docs.is_empty(), "{here}.{name} is empty");
                        for d in &docs {
                            walk(d, &format!("{here}.{name}"), found);
                        }
                    }
                }
                walk(v, &here, found);
            }
        }
        Yaml::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                walk(v, &format!("{at}[{i}]"), found);
            }
        }
        _ => {}
    }
}

pub fn load_docs() -> (Found, usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Found::default();
    let mut blocks = 0;
    for doc in DOCS {
        let text = std::fs::read_to_string(root.join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"));
        for (line, block) in yaml_blocks(&text) {
            blocks += 1;
            let at = format!("{doc}:{line}");
            let docs = YamlLoader::load_from_str(&block)
                .unwrap_or_else(|e| panic!("{at}: invalid YAML: {e}\n{block}"));
            assert!(
                !docs.is_empty() && docs.iter().all(|d| !d.is_null()),
                "{at}: empty YAML block"
            );
            for d in &docs {
                walk(d, &at, &mut found);
            }
        }
    }
    (found, blocks)
}

/// `--annotations FILE` is istio-init's own addition: split it off, returning the file.
fn split_annotations(args: &[String]) -> (Vec<String>, Option<String>) {
    let mut rest = Vec::new();
    let mut file = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--annotations" {
            file = Some(it.next().expect("--annotations needs a value").clone());
        } else if let Some(f) = a.strip_prefix("--annotations=") {
            file = Some(f.to_owned());
        } else {
            rest.push(a.clone());
        }
    }
    (rest, file)
}

#[test]
fn every_yaml_block_in_the_recipes_loads() {
    let (found, blocks) = load_docs();
    assert!(blocks >= 7, "only {blocks} YAML blocks found");
    assert!(found.containers.len() >= 3, "{:?}", found.containers);
}

#[test]
fn recipe_arg_lists_are_what_the_injector_renders() {
    let Some(dir) = util::shared_conformance() else {
        return;
    };
    let injected: Vec<Vec<String>> = serde_json::from_str(
        &std::fs::read_to_string(dir.join("injected-args.json")).expect("injected-args.json"),
    )
    .expect("injected-args.json");
    let (found, _) = load_docs();
    let mut shown = Vec::new();
    for c in &found.containers {
        let Some(args) = &c.args else { continue };
        let (args, annotations) = split_annotations(args);
        assert!(
            injected.contains(&args),
            "{} ({}): this argument list is not one Istio's injector renders: {args:?}",
            c.at,
            c.name
        );
        if let Some(file) = annotations {
            // The file must be the Downward API item `annotations` of a mounted istio-podinfo.
            let mounts = &c.y["volumeMounts"];
            let dir = mounts
                .as_vec()
                .into_iter()
                .flatten()
                .find(|m| m["name"].as_str() == Some("istio-podinfo"))
                .and_then(|m| m["mountPath"].as_str())
                .unwrap_or_else(|| {
                    panic!("{}: --annotations without an istio-podinfo mount", c.at)
                });
            assert_eq!(file, format!("{dir}/annotations"), "{}", c.at);
        }
        shown.push((c.name.clone(), args));
    }
    // The recipes show the default istio-init list and the default istio-validation list.
    assert!(
        shown.contains(&("istio-init".to_owned(), injected[0].clone())),
        "{shown:?}"
    );
    assert!(
        shown.contains(&("istio-validation".to_owned(), injected[1].clone())),
        "{shown:?}"
    );
}

/// What the recipes tell users to set agrees with how Istio reads it.
#[test]
fn recipe_values_agree_with_the_facts() {
    let (found, _) = load_docs();
    assert!(!found.init_images.is_empty());
    let reference = &found.init_images[0].1;
    for (at, image) in &found.init_images {
        // Used verbatim only when it contains a '/', so it must carry its own tag or digest.
        let last = image.rsplit('/').next().unwrap_or_default();
        assert!(
            image.contains('/') && (last.contains(':') || image.contains("@sha256:")),
            "{at}: {image:?} must be a full reference REGISTRY/REPO:TAG"
        );
        assert_eq!(image, reference, "{at}: one image throughout the recipes");
    }
    for c in &found.containers {
        if let Some(image) = &c.image {
            assert_eq!(
                image, reference,
                "{}: one image throughout the recipes",
                c.at
            );
        }
    }

    // Autopilot recipes turn CNI off; the validation recipe turns it on. Both say so.
    assert!(
        found.operators.iter().any(|(_, c)| *c == Some(false)),
        "{:?}",
        found.operators
    );
    for (at, cni) in &found.operators {
        assert!(
            cni.is_some(),
            "{at}: say spec.components.cni.enabled explicitly"
        );
    }

    // The security contexts are Istio's template's (behaviour doc §1.7).
    let caps = |c: &Container, set: &str| -> Vec<String> {
        c.y["securityContext"]["capabilities"][set]
            .as_vec()
            .map(|v| {
                v.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut checked = 0;
    for c in &found.containers {
        let sc = &c.y["securityContext"];
        if sc.is_badvalue() {
            continue;
        }
        checked += 1;
        assert_eq!(sc["privileged"].as_bool(), Some(false), "{}", c.at);
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{}",
            c.at
        );
        assert_eq!(caps(c, "drop"), ["ALL"], "{}", c.at);
        match c.name.as_str() {
            "istio-init" => {
                assert_eq!(caps(c, "add"), ["NET_ADMIN", "NET_RAW"], "{}", c.at);
                assert_eq!(sc["runAsUser"].as_i64(), Some(0), "{}", c.at);
            }
            "istio-validation" => {
                assert!(caps(c, "add").is_empty(), "{}", c.at);
                assert_eq!(sc["runAsUser"].as_i64(), Some(1337), "{}", c.at);
                assert_eq!(
                    sc["readOnlyRootFilesystem"].as_bool(),
                    Some(true),
                    "{}",
                    c.at
                );
            }
            other => panic!("{}: unexpected container {other}", c.at),
        }
    }
    assert!(checked >= 3, "only {checked} security contexts checked");
}

#[test]
fn readme_links_the_recipes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    assert!(
        readme.contains("(docs/kubernetes.md)"),
        "README must link docs/kubernetes.md"
    );
    assert!(
        readme.contains("(image/README.md)"),
        "README must link image/README.md"
    );
}
