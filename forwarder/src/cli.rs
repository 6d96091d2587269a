//! The command line. These names are a contract with users and scripts: keep them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Mode;
use crate::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "forwarder",
    version = env!("FORWARDER_LONG_VERSION"),
    about = "TCP port forwarder: eBPF sockmap fast path, splice(2) fallback"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Forward connections: one rule from --listen/--upstream, or the rules of a config file.
    Run(RunArgs),
    /// Validate a config file and exit: 0 when valid, 2 with the offending key otherwise.
    Check(CheckArgs),
    /// Tunnel agent: dial a forwarder's --tunnel-listen port and serve its visitors
    /// from local targets (the private side of a reverse tunnel).
    Agent(AgentArgs),
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The tunnel server's agent port, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub server: String,
    /// A service to offer, NAME=HOST:PORT (its target); repeat for more.
    #[arg(long, value_name = "NAME=HOST:PORT", required = true)]
    pub service: Vec<String>,
    /// File holding the shared token (else the FORWARDER_TOKEN environment variable).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Log lines as text (default) or one JSON object per line.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Worker threads (default: one per CPU).
    #[arg(long, value_name = "N", value_parser = threads)]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address to accept connections on, HOST:PORT (port 0 picks a free port; the log says which).
    #[arg(
        long,
        value_name = "HOST:PORT",
        requires = "upstream",
        conflicts_with = "config"
    )]
    pub listen: Option<String>,
    /// Where to forward to, HOST:PORT; repeat for failover, tried in order.
    #[arg(long, value_name = "HOST:PORT", requires = "listen")]
    pub upstream: Vec<String>,
    /// Also accept tunnel agents here, HOST:PORT, for `--upstream agent:NAME`.
    #[arg(long, value_name = "HOST:PORT", requires = "listen")]
    pub tunnel_listen: Option<String>,
    /// File holding the tunnel token (else the FORWARDER_TOKEN environment variable).
    #[arg(long, value_name = "FILE", requires = "tunnel_listen")]
    pub token_file: Option<PathBuf>,
    /// Relay path for every rule (overrides the config file's mode keys).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Log lines as text (default) or one JSON object per line (overrides global.log_format).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Worker threads (overrides global.threads; default: one per CPU).
    #[arg(long, value_name = "N", value_parser = threads)]
    pub threads: Option<usize>,
    /// TOML config file.
    #[arg(
        short = 'c',
        long,
        value_name = "FILE",
        required_unless_present = "listen"
    )]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// TOML config file.
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: PathBuf,
}

fn threads(s: &str) -> Result<usize, String> {
    crate::config::check_threads(s.parse::<usize>().map_err(|e| e.to_string())?)
}
