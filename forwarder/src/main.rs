use std::process::ExitCode;

use clap::Parser;
use forwarder::cli::{Cli, Command};
use forwarder::config::{CliRule, Config, ConfigError};

/// Exit codes: 2 for anything wrong in what the user asked for, 1 for failures to run.
fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Check(args) => match Config::from_file(&args.config) {
            Ok(c) => {
                println!("{}: ok, {} rule(s)", args.config.display(), c.rules.len());
                ExitCode::SUCCESS
            }
            Err(e) => config_error(e),
        },
        Command::Run(args) => {
            let config = match (&args.config, args.listen) {
                (Some(path), _) => Config::from_file(path),
                (None, Some(listen)) => Config::from_cli(CliRule {
                    listen,
                    upstreams: args.upstream,
                }),
                (None, None) => unreachable!("clap requires --config or --listen"),
            };
            let mut config = match config {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            if let Some(mode) = args.mode {
                config.override_mode(mode);
            }
            forwarder::sys::raise_fd_limit();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => return failure(anyhow::anyhow!("cannot start the runtime: {e}")),
            };
            match runtime.block_on(forwarder::server::run(config)) {
                Ok(()) => {
                    // Connections still open after a forced stop are closed by exit.
                    runtime.shutdown_background();
                    ExitCode::SUCCESS
                }
                Err(e) => failure(e),
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FORWARDER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
}

fn config_error(e: ConfigError) -> ExitCode {
    eprintln!("forwarder: {e}");
    ExitCode::from(2)
}

fn failure(e: anyhow::Error) -> ExitCode {
    eprintln!("forwarder: {e:#}");
    ExitCode::from(1)
}
