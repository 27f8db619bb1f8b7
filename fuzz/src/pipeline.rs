//! Resolves a pod's annotation overrides over a fixed mesh configuration and checks what
//! comes out, for the annotation and manifest targets.

use istio_init::settings::annotations::PodSettings;
use istio_init::settings::cli;
use istio_init::settings::config::{Config, ConfigError, Inputs};
use istio_init::capture::{Facts, build};

use crate::{assert_one_line, check_ruleset};

/// A translation error is one line; a translation resolves (or is refused in one line) over
/// the standard sidecar's mesh settings and the injector's, and every accepted configuration
/// builds a sound ruleset for both families.
pub fn check_pod_settings(settings: Result<PodSettings, ConfigError>) {
    let settings = match settings {
        Ok(s) => s,
        Err(e) => return assert_one_line(&e.to_string()),
    };
    for w in &settings.warnings {
        assert!(!w.contains('\n'), "warning is not one line: {w:?}");
    }
    for argv in [&["istio-init"][..], &["istio-init", "istio-iptables"]] {
        let Ok(inv) = cli::parse(argv) else {
            unreachable!("fixed argv")
        };
        let cfg = Config::resolve(&Inputs {
            defaults: inv.defaults,
            flags: &inv.flags,
            env: &|_| None,
            user_uid: &|_| None,
            pod: &settings.overrides,
        });
        match cfg {
            Err(e) => assert_one_line(&e.to_string()),
            Ok(cfg) => {
                let dump = cfg.dump();
                assert_eq!(dump.lines().count(), cfg.provenance.len(), "{dump}");
                let facts = Facts {
                    ipv6: true,
                    dns_servers: vec!["198.18.0.53".parse().unwrap_or_else(|_| unreachable!())],
                };
                for family in facts.families() {
                    check_ruleset(&build(&cfg, &facts).family(family));
                }
            }
        }
    }
}
