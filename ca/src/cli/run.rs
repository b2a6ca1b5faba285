//! `mayfly-ca run`: the control plane, until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use mayfly_ca::duration::parse_duration;
use mayfly_ca::server::{self, CaSettings, RunOptions};

use super::DataDirArg;

#[derive(Args)]
pub(super) struct RunArgs {
    #[command(flatten)]
    dir: DataDirArg,
    /// API listener (HTTPS, mTLS).
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Plain-HTTP listener for /metrics and /healthz ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:8444")]
    metrics_listen: String,
    /// OS users allowed on the admin socket (repeatable). Default: root and the owner of the
    /// data directory.
    #[arg(long = "admin")]
    admins: Vec<String>,
    /// Where to bind the admin socket. Default: `admin.sock` in the data directory, which only
    /// the data directory's owner can reach (it is 0700); put it in a directory other admins can
    /// enter (e.g. systemd's `RuntimeDirectory=mayfly-ca`) to let them approve grants.
    #[arg(long, env = "MAYFLY_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
    /// A group whose members may connect to the admin socket (mode 0660). What each may do is
    /// still decided by their OS user (`--admin`).
    #[arg(long)]
    admin_group: Option<String>,
    /// SVID TTL when a sidecar does not ask for one.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    svid_ttl: Duration,
    /// Longest SVID TTL granted (at most 60m).
    #[arg(long, default_value = "60m", value_parser = parse_duration)]
    svid_max_ttl: Duration,
    /// Longest join-token TTL.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    token_max_ttl: Duration,
    /// Extra DNS names / IPs in the control plane's own SVID, for curl and openssl
    /// (repeatable; default localhost, 127.0.0.1, ::1).
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// How long a client may take for the TLS handshake, headers and body.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    client_timeout: Duration,
    /// Most API connections open at once; more are closed as soon as they are accepted. Each
    /// sidecar holds about two (watch stream, audit session).
    #[arg(long, default_value_t = server::http::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// How long an endpoint registration lasts unless the sidecar refreshes it (at most 60s;
    /// never past the sidecar's SVID).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    endpoint_lease: Duration,
    /// A policy file to validate, version, hot-reload and push to every sidecar.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Log format on standard error: text (coloured only on a terminal) or JSON lines.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// The read-only web console: an address, or "off". Default 127.0.0.1:8445 (skipped with
    /// a warning when that port is taken). Any address but loopback needs --ui-tls.
    #[arg(long, env = "MAYFLY_UI_LISTEN")]
    ui_listen: Option<String>,
    /// Serve the console over TLS with the control plane's SVID, only to clients presenting an
    /// SVID whose SPIFFE ID is allowed (--ui-allow).
    #[arg(long)]
    ui_tls: bool,
    /// A SPIFFE ID allowed into the console over TLS (repeatable).
    #[arg(long = "ui-allow", value_name = "SPIFFE_ID")]
    ui_allow: Vec<String>,
    /// Kubernetes attestation: the cluster's service-account issuer JWK Set, a file
    /// (`kubectl get --raw /openid/v1/jwks`), re-read when it changes.
    #[arg(long, requires = "k8s_issuer")]
    k8s_jwks: Option<PathBuf>,
    /// Kubernetes attestation: the issuer (`iss`) of service-account tokens
    /// (`kubectl get --raw /.well-known/openid-configuration`).
    #[arg(long, requires = "k8s_jwks")]
    k8s_issuer: Option<String>,
    /// Sign-in: an OpenID Connect issuer people sign in with (`mayfly login`); its tokens'
    /// `iss` exactly. https, or http on loopback only.
    #[arg(long, requires = "oidc_client_id")]
    oidc_issuer: Option<String>,
    /// Sign-in: the OAuth client ID of `mayfly login` at --oidc-issuer (the ID tokens' audience).
    #[arg(long, requires = "oidc_issuer")]
    oidc_client_id: Option<String>,
    /// Sign-in: a TOML file of `[[oidc]]` issuers (issuer, client_id, user_claim, groups_claim,
    /// svid_ttl, jwks_max_age, ca_file); see the README's "People: sign in".
    #[arg(long)]
    oidc_config: Option<PathBuf>,
}

fn oidc(args: &RunArgs) -> Result<server::oidc::Verifier> {
    use server::oidc::{IssuerConfig, OidcConfig};
    let mut cfg = match &args.oidc_config {
        Some(path) => OidcConfig::load(path).context("--oidc-config")?,
        None => OidcConfig::default(),
    };
    if let (Some(issuer), Some(client_id)) = (&args.oidc_issuer, &args.oidc_client_id) {
        cfg.add(IssuerConfig::new(issuer, client_id).context("--oidc-issuer")?)
            .context("--oidc-issuer")?;
    }
    server::oidc::Verifier::new(&cfg).context("OpenID Connect issuers")
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never in files or log collectors.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// A group name or number as a GID.
fn resolve_group(name: &str) -> Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    Ok(nix::unistd::Group::from_name(name)
        .context("cannot look up group")?
        .with_context(|| format!("--admin-group {name}: no such group"))?
        .gid
        .as_raw())
}

fn resolve_admins(names: &[String], dir: &Path) -> Result<Vec<u32>> {
    use std::os::unix::fs::MetadataExt;
    let mut uids = vec![0];
    if names.is_empty() {
        // A missing directory is reported by the start-up checks with a better message.
        if let Ok(meta) = std::fs::metadata(dir) {
            uids.push(meta.uid());
        }
    }
    for n in names {
        let uid = match n.parse::<u32>() {
            Ok(uid) => uid,
            Err(_) => nix::unistd::User::from_name(n)
                .context("cannot look up user")?
                .with_context(|| format!("--admin {n}: no such user"))?
                .uid
                .as_raw(),
        };
        uids.push(uid);
    }
    uids.sort_unstable();
    uids.dedup();
    Ok(uids)
}

pub(super) async fn run(args: RunArgs) -> Result<()> {
    init_logging(args.log_format);
    if args.svid_max_ttl > mayfly_ca::issue::MAX_SVID_TTL {
        bail!("--svid-max-ttl may not exceed 60m");
    }
    if args.endpoint_lease.is_zero() || args.endpoint_lease > server::registry::MAX_LEASE {
        bail!("--endpoint-lease must be between 1s and 60s");
    }
    if args.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    let metrics_listen = match args.metrics_listen.as_str() {
        "off" | "" => None,
        s => Some(
            s.parse::<SocketAddr>()
                .with_context(|| format!("--metrics-listen {s}"))?,
        ),
    };
    let console = match args.ui_listen.as_deref() {
        Some("off" | "") => None,
        given => {
            let listen = given
                .unwrap_or(server::console::DEFAULT_LISTEN)
                .parse::<SocketAddr>()
                .with_context(|| format!("--ui-listen {}", given.unwrap_or_default()))?;
            Some(server::console::ConsoleOptions {
                listen,
                tls: args.ui_tls,
                allow: args.ui_allow.clone(),
                must_bind: given.is_some(),
            })
        }
    };
    let settings = CaSettings {
        svid_default_ttl: args.svid_ttl.min(args.svid_max_ttl),
        svid_max_ttl: args.svid_max_ttl,
        token_max_ttl: args.token_max_ttl,
        admin_uids: resolve_admins(&args.admins, &args.dir.data_dir)?,
        server_names: if args.server_names.is_empty() {
            CaSettings::default().server_names
        } else {
            args.server_names.clone()
        },
        client_timeout: args.client_timeout,
        max_connections: args.max_connections,
        endpoint_lease: args.endpoint_lease,
        k8s: match (&args.k8s_jwks, &args.k8s_issuer) {
            (Some(path), Some(issuer)) => Some(std::sync::Arc::new(
                server::attest::K8sAttestor::load(path, issuer).context("--k8s-jwks")?,
            )),
            _ => None,
        },
        oidc: std::sync::Arc::new(oidc(&args)?),
    };
    let running = server::start(RunOptions {
        data_dir: args.dir.data_dir.clone(),
        listen: args.listen,
        metrics_listen,
        settings,
        drain: Duration::from_secs(10),
        policy_file: args.policy.clone(),
        admin_socket: args.admin_socket.clone(),
        admin_group: args.admin_group.as_deref().map(resolve_group).transpose()?,
        store: args.dir.store.options()?,
        console,
    })
    .await
    .context("cannot start the control plane")?;
    // The line tests and scripts wait for.
    eprintln!("mayfly-ca listening on {}", running.api_addr);
    if let Some(m) = running.metrics_addr {
        eprintln!("mayfly-ca metrics on http://{m}/metrics");
    }
    if let Some(c) = running.console_addr {
        let scheme = if args.ui_tls { "https" } else { "http" };
        eprintln!("mayfly-ca console on {scheme}://{c}/");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: draining connections (up to 10s)");
    running.shutdown().await;
    Ok(())
}
