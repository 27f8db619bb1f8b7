//! The `istio-init` binary: parse the command line, run, map the outcome to an exit code.

use std::process::ExitCode;

use istio_init::settings::cli;
use istio_init::{Env, exit};

fn main() -> ExitCode {
    let inv = match cli::parse(std::env::args_os()) {
        Ok(inv) => inv,
        Err(e) => {
            // Help and version go to stdout with exit 0; usage errors to stderr with exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::SUCCESS
            });
        }
    };
    if let Err(e) = istio_init::settings::config::check_env_encoding(&|name| std::env::var_os(name))
    {
        eprintln!("error: {e}");
        return ExitCode::from(exit::USAGE);
    }
    let var = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    match istio_init::run(&inv, &Env { var: &var }) {
        Ok(()) => ExitCode::from(exit::SUCCESS),
        Err(err) => {
            let code = exit::code_for(&err);
            eprintln!("error: {err:#}");
            ExitCode::from(code)
        }
    }
}
