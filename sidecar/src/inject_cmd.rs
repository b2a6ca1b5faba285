//! `mayfly-sidecar inject FILE|-` and `mayfly-sidecar inject serve`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mayfly_inject::webhook::Webhook;
use mayfly_inject::{self as inject, ConfigRejected, InjectOptions};
use mayfly_sidecar::config::Config;

/// The injection options are global: `inject --ca-pin PIN serve ...` and `inject serve --ca-pin
/// PIN ...` are the same, as `deploy/README.md` writes them.
#[derive(Args)]
#[command(subcommand_negates_reqs = true)]
pub(crate) struct InjectCmd {
    #[command(subcommand)]
    serve: Option<ServeCmd>,
    /// Kubernetes YAML to inject (`-` for stdin); the result goes to stdout.
    #[arg(value_name = "FILE|-", required = true)]
    file: Option<String>,
    #[command(flatten)]
    opts: OptionArgs,
}

#[derive(Subcommand)]
enum ServeCmd {
    /// Serve the injector as a mutating admission webhook (`POST /mutate`, HTTPS).
    Serve {
        /// Listen address.
        #[arg(long, default_value = "0.0.0.0:9443")]
        listen: SocketAddr,
        /// Serving certificate chain (PEM), re-read when it changes.
        #[arg(long)]
        tls_cert: PathBuf,
        /// Serving key (PEM), re-read when it changes.
        #[arg(long)]
        tls_key: PathBuf,
        #[command(flatten)]
        log: crate::LogArgs,
    },
}

#[derive(Args)]
struct OptionArgs {
    /// The root pin of the control plane: `mayfly-ca bundle show --format pin` (required).
    #[arg(long, env = "MAYFLY_CA_PIN", global = true)]
    ca_pin: Option<String>,
    /// The sidecar image.
    #[arg(long, default_value = inject::DEFAULT_IMAGE, global = true)]
    image: String,
    /// The trust domain of the SPIFFE IDs (spiffe://TD/ns/NS/sa/SA).
    #[arg(long, default_value = "mayfly.local", global = true)]
    trust_domain: String,
    /// The control plane's host:port as pods reach it.
    #[arg(long, default_value = inject::DEFAULT_CONTROL_PLANE, global = true)]
    control_plane: String,
    /// The ConfigMap, in each pod's namespace, whose `policy.toml` the sidecar loads.
    #[arg(long, default_value = "mayfly-policy", global = true)]
    policy_configmap: String,
}

impl OptionArgs {
    /// The options; a missing pin is a usage error (exit 2), as clap reports one. (A global
    /// argument cannot be `required` in clap, hence the check here.)
    fn into_options(self) -> InjectOptions {
        let Some(ca_pin) = self.ca_pin else {
            clap::Error::raw(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--ca-pin PIN (or MAYFLY_CA_PIN) is required: `mayfly-ca bundle show --format pin`\n",
            )
            .exit()
        };
        InjectOptions {
            image: self.image,
            trust_domain: self.trust_domain,
            control_plane: self.control_plane,
            ca_pin,
            policy_configmap: self.policy_configmap,
            check_config,
        }
    }
}

/// The sidecar's own parser checks every configuration the injector generates: a pod is never
/// given a sidecar that would refuse to start.
fn check_config(text: &str) -> std::result::Result<(), ConfigRejected> {
    Config::parse(text, inject::CONFIG_ENV, Path::new("/"))
        .map(drop)
        .map_err(|e| ConfigRejected(e.to_string()))
}

pub(crate) fn run(cmd: InjectCmd) -> ExitCode {
    let result = match cmd.serve {
        Some(ServeCmd::Serve {
            listen,
            tls_cert,
            tls_key,
            log,
        }) => {
            if let Some(file) = &cmd.file {
                clap::Error::raw(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("`inject serve` reads no file (got {file:?}): inject FILE, or serve\n"),
                )
                .exit()
            }
            let opts = cmd.opts.into_options();
            crate::init_logging(log.json());
            serve(listen, tls_cert, tls_key, opts)
        }
        None => filter(cmd.file.as_deref().unwrap_or("-"), cmd.opts.into_options()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::report(&e));
            ExitCode::FAILURE
        }
    }
}

fn filter(file: &str, opts: InjectOptions) -> Result<()> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read stdin")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?
    };
    let out = inject::inject_yaml(&text, &opts).with_context(|| file.to_owned())?;
    print!("{out}");
    Ok(())
}

fn serve(
    listen: SocketAddr,
    tls_cert: PathBuf,
    tls_key: PathBuf,
    opts: InjectOptions,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let hook = Webhook::bind(listen, &tls_cert, &tls_key, opts)
            .await
            .context("cannot start the webhook")?;
        eprintln!(
            "mayfly-sidecar webhook on {}",
            hook.local_addr().unwrap_or(listen)
        );
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(hook.serve(stop));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stop_tx.send(true);
        let _ = task.await;
        Ok(())
    })
}
