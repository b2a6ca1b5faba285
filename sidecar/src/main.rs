//! `mayfly-sidecar`: the data plane.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use mayfly_sidecar::config::{Config, ConfigError};

mod inject_cmd;

#[derive(Parser)]
#[command(
    name = "mayfly-sidecar",
    version,
    about = "mayfly sidecar: SPIFFE mTLS, policy, rotation"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sidecar.
    Run {
        #[command(flatten)]
        source: ConfigSource,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Check a configuration and exit.
    Check {
        #[command(flatten)]
        source: ConfigSource,
        /// Print JSON (`{"config", "ok", "error"}`) on standard output.
        #[arg(long)]
        json: bool,
    },
    /// Add the sidecar to Kubernetes workloads (YAML in, YAML out), or serve the same as a
    /// mutating admission webhook (`inject serve`).
    Inject(Box<inject_cmd::InjectCmd>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on standard output.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on standard output: `mayfly-sidecar man | man -l -`.
    Man,
}

/// The log format, spelled as `mayfly-ca run --log-format`.
#[derive(Args)]
pub(crate) struct LogArgs {
    /// Log format on standard error: text (coloured only on a terminal) or JSON lines.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// The former spelling of `--log-format json`, kept for existing units and manifests.
    #[arg(long, hide = true)]
    log_json: bool,
}

impl LogArgs {
    pub(crate) fn json(&self) -> bool {
        self.log_json || matches!(self.log_format, LogFormat::Json)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Where the configuration comes from: a file, or a variable holding the whole TOML.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct ConfigSource {
    /// The sidecar configuration file.
    #[arg(long, env = "MAYFLY_SIDECAR_CONFIG")]
    config: Option<PathBuf>,
    /// The name of an environment variable holding the whole configuration TOML (as
    /// `mayfly-sidecar inject` sets up: MAYFLY_SIDECAR_CONFIG_TOML).
    #[arg(long, value_name = "VAR")]
    config_env: Option<String>,
}

impl ConfigSource {
    fn load(&self) -> Result<(Config, String), ConfigError> {
        match (&self.config, &self.config_env) {
            (_, Some(var)) => Ok((Config::load_env(var)?, format!("${var}"))),
            (Some(path), None) => Ok((Config::load(path)?, path.display().to_string())),
            (None, None) => Err(ConfigError::Env {
                var: "MAYFLY_SIDECAR_CONFIG".into(),
                reason: "set --config FILE or --config-env VAR".into(),
            }),
        }
    }

    /// How the configuration is named in messages, also when it does not load.
    fn name(&self) -> String {
        match (&self.config, &self.config_env) {
            (_, Some(var)) => format!("${var}"),
            (Some(path), None) => path.display().to_string(),
            (None, None) => "MAYFLY_SIDECAR_CONFIG".into(),
        }
    }

    /// The configuration and the files it names: `[policy] file` must exist and hold a valid
    /// policy and the audit spool directory must be writable, for `check` as for `run` (both
    /// exit 64 otherwise).
    fn load_checked(&self) -> Result<(Config, String), String> {
        let (cfg, name) = self.load().map_err(|e| e.to_string())?;
        cfg.check_policy_file(&name).map_err(|e| e.to_string())?;
        cfg.audit
            .check_spool_dir(&name)
            .map_err(|e| e.to_string())?;
        let metrics = std::sync::Arc::new(mayfly_sidecar::metrics::Metrics::new());
        mayfly_sidecar::policy::PolicyState::new(cfg.policy_file.clone(), metrics)
            .load_file()
            .map_err(|e| format!("{name}: `policy.file`: {e}"))?;
        Ok((cfg, name))
    }
}

/// Exit status for a bad configuration (EX_CONFIG-like, as `sysexits.h` EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn init_logging(json: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never in files or log collectors.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// An error and its causes, each said once (see [`mayfly_ca::report::report`]).
pub(crate) fn report(e: &anyhow::Error) -> String {
    mayfly_ca::report::report(e.as_ref())
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    use anyhow::Context;
    let running = mayfly_sidecar::start(cfg)
        .await
        .context("cannot start the sidecar")?;
    eprintln!("mayfly-sidecar admin on {}", running.admin_addr);
    for (n, a) in running.inbound_addrs.iter().enumerate() {
        match n {
            0 => eprintln!("mayfly-sidecar inbound on {a}"),
            n => eprintln!("mayfly-sidecar inbound[{n}] on {a}"),
        }
    }
    for (name, a) in &running.outbound_addrs {
        eprintln!("mayfly-sidecar outbound {name} on {a}");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let failed = tokio::select! {
        _ = term.recv() => None,
        _ = tokio::signal::ctrl_c() => None,
        why = running.failed() => Some(why),
    };
    tracing::info!("shutting down: no new connections, draining open ones");
    running.shutdown().await;
    match failed {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    mayfly_ca::report::end_quietly_on_closed_output();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Inject(cmd) => inject_cmd::run(*cmd),
        Cmd::Completions { shell } => {
            use std::io::Write;
            // Into memory first: clap_complete panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mayfly-sidecar", &mut script);
            match std::io::stdout().write_all(&script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write the completion script: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Man => match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot write the manual page: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Check { source, json } => {
            let (name, result) = match source.load_checked() {
                Ok((_, name)) => (name, Ok(())),
                Err(e) => (source.name(), Err(e)),
            };
            if json {
                let v = serde_json::json!({
                    "config": name,
                    "ok": result.is_ok(),
                    "error": result.as_ref().err(),
                });
                println!("{v}");
            }
            match result {
                Ok(()) => {
                    if !json {
                        println!("{name}: ok");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Cmd::Run { source, log } => {
            // Parse all configuration (and the policy file) before binding any port.
            let cfg = match source.load_checked() {
                Ok((c, _)) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            // The app probes the admin listener forwards (set by `inject`): refused up front.
            let probes = std::env::var(mayfly_sidecar::admin::APP_PROBES_ENV).ok();
            if let Err(e) = mayfly_sidecar::admin::parse_app_probes(probes.as_deref()) {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            init_logging(log.json());
            let rt = if cfg.worker_threads == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(cfg.worker_threads)
                    .enable_all()
                    .build()
            };
            let rt = match rt {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {}", report(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}
