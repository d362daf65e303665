//! The command line (placeholder until the CLI lands).

use std::process::ExitCode;

/// Runs `dcbflow serve` with defaults.
pub fn main() -> ExitCode {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let config = match crate::config::Config::load(None, &|k| std::env::var(k).ok()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        };
        match crate::serve::serve(config, crate::serve::ServeOptions::default()).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        }
    })
}
