//! `mayfly-ca`: the control plane and its admin CLI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use mayfly_ca::authority::AuthorityConfig;
use mayfly_ca::duration::{format_duration, parse_duration};
use mayfly_ca::server::admin::{self, AdminRequest};
use mayfly_ca::server::{self, CaSettings, RunOptions};
use serde_json::Value;

mod audit_cmd;
mod grant_cmd;
mod policy_cmd;

#[derive(Parser)]
#[command(
    name = "mayfly-ca",
    version,
    about = "mayfly control plane: SPIFFE CA, join tokens, policy, audit"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct DataDirArg {
    /// The control plane's data directory.
    #[arg(long, env = "MAYFLY_DATA_DIR")]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a data directory with a new root CA and intermediate CA.
    Init {
        #[command(flatten)]
        dir: DataDirArg,
        /// The trust domain, such as mayfly.local (lowercase).
        #[arg(long, default_value = "mayfly.local")]
        trust_domain: String,
        /// Root CA lifetime.
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        root_ttl: Duration,
        /// Intermediate CA lifetime.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        intermediate_ttl: Duration,
        /// Succeed without change if the directory already holds a CA of this trust domain
        /// (for init containers and systemd ExecStartPre).
        #[arg(long)]
        exist_ok: bool,
    },
    /// Run the control plane.
    Run(RunArgs),
    /// SVIDs for workloads outside the mesh.
    #[command(subcommand)]
    Svid(SvidCmd),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// The CA authorities.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Join tokens (through the running control plane's admin socket).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Policy files: validate and explain.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCmd),
    /// The audit trail: tail, query, verify.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCmd),
    /// Just-in-time grants: request, approve, deny, revoke, list.
    #[command(subcommand)]
    Grant(grant_cmd::GrantCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on standard output.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on standard output: `mayfly-ca man | man -l -`.
    Man,
}

#[derive(Args)]
struct RunArgs {
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
    /// A policy file to validate, version, hot-reload and push to every sidecar.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Log format on standard error: text (coloured only on a terminal) or JSON lines.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Kubernetes attestation: the cluster's service-account issuer JWK Set, a file
    /// (`kubectl get --raw /openid/v1/jwks`), re-read when it changes.
    #[arg(long, requires = "k8s_issuer")]
    k8s_jwks: Option<PathBuf>,
    /// Kubernetes attestation: the issuer (`iss`) of service-account tokens
    /// (`kubectl get --raw /.well-known/openid-configuration`).
    #[arg(long, requires = "k8s_jwks")]
    k8s_issuer: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum SvidCmd {
    /// Sign an SVID with the CA's active intermediate and write it to files.
    Mint {
        #[command(flatten)]
        dir: DataDirArg,
        /// The SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime (1s to 60m).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        ttl: Duration,
        /// Output directory: svid.pem, svid.key (0600), bundle.pem, bundle.json.
        #[arg(long)]
        out: PathBuf,
        /// Print JSON (spiffe_id, serial, not_after, files).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BundleCmd {
    /// Print the trust bundle.
    Show {
        #[command(flatten)]
        dir: DataDirArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "jwks")]
        format: BundleFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum BundleFormat {
    Pem,
    Jwks,
    /// The active root's pin (hex SHA-256 of its SubjectPublicKeyInfo), for `ca_pin` and
    /// `mayfly-sidecar inject --ca-pin`.
    Pin,
}

#[derive(Subcommand)]
enum CaCmd {
    /// Each authority, its state and expiry.
    Status {
        #[command(flatten)]
        dir: DataDirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a single-use join token bound to one SPIFFE ID.
    Create {
        #[command(flatten)]
        dir: DataDirArg,
        /// The SPIFFE ID the token may obtain.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime (at most the server's --token-max-ttl).
        #[arg(long, default_value = "10m")]
        ttl: String,
        /// Print JSON (id, expiry, token) instead of the bare token.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        dir: DataDirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an unused token by id.
    Revoke {
        #[command(flatten)]
        dir: DataDirArg,
        /// The token id (the second field of the token, as `token list` shows).
        id: String,
    },
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

fn when(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
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

async fn run(args: RunArgs) -> Result<()> {
    init_logging(args.log_format);
    if args.svid_max_ttl > mayfly_ca::issue::MAX_SVID_TTL {
        bail!("--svid-max-ttl may not exceed 60m");
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
        k8s: match (&args.k8s_jwks, &args.k8s_issuer) {
            (Some(path), Some(issuer)) => Some(std::sync::Arc::new(
                server::attest::K8sAttestor::load(path, issuer).context("--k8s-jwks")?,
            )),
            _ => None,
        },
    };
    let running = server::start(RunOptions {
        data_dir: args.dir.data_dir.clone(),
        listen: args.listen,
        metrics_listen,
        settings,
        drain: Duration::from_secs(10),
        policy_file: args.policy.clone(),
    })
    .await
    .context("cannot start the control plane")?;
    // The line tests and scripts wait for.
    eprintln!("mayfly-ca listening on {}", running.api_addr);
    if let Some(m) = running.metrics_addr {
        eprintln!("mayfly-ca metrics on http://{m}/metrics");
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

async fn admin_call(dir: &Path, req: AdminRequest) -> Result<Value> {
    let socket = dir.join(server::datadir::ADMIN_SOCKET);
    admin::call(&socket, &req).await.map_err(anyhow::Error::msg)
}

fn mint(dir: &Path, id: &str, ttl: Duration, out: &Path, json: bool) -> Result<()> {
    use mayfly_ca::keys::{SecretKey, pem_encode};
    let id = mayfly_ca::id::parse_issuable_id(id)?;
    let (_dd, store, authorities) = server::open(dir)?;
    let key = SecretKey::generate()?;
    let now = time::OffsetDateTime::now_utc();
    let signer = authorities.signer().context("no active intermediate CA")?;
    let issued = mayfly_ca::issue::issue_for_key(signer, &key, &id, ttl, now)?;
    let bundle = server::bundle_of(&authorities)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let chain: String = issued
        .chain
        .iter()
        .map(|c| pem_encode("CERTIFICATE", c))
        .collect();
    std::fs::write(out.join("svid.pem"), chain).context("cannot write svid.pem")?;
    server::datadir::write_secret(&out.join("svid.key"), key.to_pem().as_bytes())
        .context("cannot write svid.key")?;
    std::fs::write(out.join("bundle.pem"), bundle.to_pem()).context("cannot write bundle.pem")?;
    std::fs::write(out.join("bundle.json"), bundle.to_jwks())
        .context("cannot write bundle.json")?;
    use mayfly_ca::store::Store;
    let who = admin::user_name(nix::unistd::getuid().as_raw());
    store.log_issued(&mayfly_ca::store::IssuedRecord {
        serial: issued.serial.clone(),
        spiffe_id: id.to_string(),
        not_after: issued.not_after,
        issued_at: now,
        requester: format!("admin:{who}"),
    })?;
    store.append_event(
        now,
        "svid.minted",
        &serde_json::json!({ "spiffe_id": id.to_string(), "serial": issued.serial, "by": who })
            .to_string(),
    )?;
    if json {
        let file = |name: &str| out.join(name).display().to_string();
        let v = serde_json::json!({
            "spiffe_id": id.to_string(),
            "serial": issued.serial,
            "not_after": issued.not_after.unix_timestamp(),
            "files": {
                "svid": file("svid.pem"),
                "key": file("svid.key"),
                "bundle_pem": file("bundle.pem"),
                "bundle_jwks": file("bundle.json"),
            },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "minted {id} (serial {}, expires {}) into {}",
        issued.serial,
        when(issued.not_after.unix_timestamp()),
        out.display()
    );
    Ok(())
}

fn print_status(v: &Value) {
    println!(
        "trust domain: {}",
        v["trust_domain"].as_str().unwrap_or("?")
    );
    println!("bundle sequence: {}", v["bundle_sequence"]);
    println!(
        "{:<18} {:<13} {:<9} {:<22} IN",
        "ID", "ROLE", "STATE", "EXPIRES"
    );
    for a in v["authorities"].as_array().into_iter().flatten() {
        println!(
            "{:<18} {:<13} {:<9} {:<22} {}",
            a["id"].as_str().unwrap_or("?"),
            a["role"].as_str().unwrap_or("?"),
            a["state"].as_str().unwrap_or("?"),
            when(a["not_after"].as_i64().unwrap_or_default()),
            a["expires_in"].as_str().unwrap_or("?"),
        );
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init {
            dir,
            trust_domain,
            root_ttl,
            intermediate_ttl,
            exist_ok,
        } => {
            if exist_ok && dir.data_dir.join(server::datadir::DB_FILE).exists() {
                let (_, _, a) = server::open(&dir.data_dir)?;
                if a.trust_domain().as_str() != trust_domain {
                    bail!(
                        "{} already holds a CA for trust domain {}, not {trust_domain}",
                        dir.data_dir.display(),
                        a.trust_domain()
                    );
                }
                println!(
                    "trust domain {} already initialised in {}",
                    a.trust_domain(),
                    dir.data_dir.display()
                );
                return Ok(());
            }
            let a = server::init(
                &dir.data_dir,
                &trust_domain,
                AuthorityConfig {
                    root_ttl,
                    intermediate_ttl,
                },
            )?;
            println!(
                "initialised trust domain {} in {} (root CA valid {}, intermediate {})",
                a.trust_domain(),
                dir.data_dir.display(),
                format_duration(root_ttl),
                format_duration(intermediate_ttl)
            );
            Ok(())
        }
        Cmd::Run(args) => run(args).await,
        Cmd::Svid(SvidCmd::Mint {
            dir,
            spiffe_id,
            ttl,
            out,
            json,
        }) => mint(&dir.data_dir, &spiffe_id, ttl, &out, json),
        Cmd::Bundle(BundleCmd::Show { dir, format }) => {
            let (_, _, a) = server::open(&dir.data_dir)?;
            let b = server::bundle_of(&a)?;
            match format {
                BundleFormat::Pem => print!("{}", b.to_pem()),
                BundleFormat::Jwks => println!("{}", b.to_jwks()),
                BundleFormat::Pin => {
                    let root = a
                        .active(mayfly_ca::authority::Role::Root)
                        .context("no active root CA")?;
                    let spki = mayfly_ca::svid::spki_der(&root.cert)?;
                    println!("{}", hex::encode(mayfly_ca::keys::sha256(&spki)));
                }
            }
            Ok(())
        }
        Cmd::Ca(CaCmd::Status { dir, json }) => {
            let (_, _, a) = server::open(&dir.data_dir)?;
            let v = server::status_json(&a);
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(())
        }
        Cmd::Token(TokenCmd::Create {
            dir,
            spiffe_id,
            ttl,
            json,
        }) => {
            let v = admin_call(&dir.data_dir, AdminRequest::TokenCreate { spiffe_id, ttl }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", v["token"].as_str().unwrap_or_default());
            }
            Ok(())
        }
        Cmd::Token(TokenCmd::List { dir, json }) => {
            let v = admin_call(&dir.data_dir, AdminRequest::TokenList).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<9} {:<8} {:<26} {:<10} SPIFFE ID",
                "ID", "STATE", "EXPIRES", "BY"
            );
            for t in v.as_array().into_iter().flatten() {
                println!(
                    "{:<9} {:<8} {:<26} {:<10} {}",
                    t["id"].as_str().unwrap_or("?"),
                    t["state"].as_str().unwrap_or("?"),
                    when(t["expires_at"].as_i64().unwrap_or_default()),
                    t["created_by"].as_str().unwrap_or("?"),
                    t["spiffe_id"].as_str().unwrap_or("?"),
                );
            }
            Ok(())
        }
        Cmd::Token(TokenCmd::Revoke { dir, id }) => {
            admin_call(&dir.data_dir, AdminRequest::TokenRevoke { id: id.clone() }).await?;
            println!("revoked token {id}");
            Ok(())
        }
        Cmd::Policy(cmd) => policy_cmd::run(cmd),
        Cmd::Audit(cmd) => audit_cmd::run(cmd).await,
        Cmd::Grant(cmd) => grant_cmd::run(cmd).await,
        Cmd::Completions { shell } => {
            use std::io::Write;
            // Into memory first: clap_complete panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mayfly-ca", &mut script);
            std::io::stdout()
                .write_all(&script)
                .context("cannot write the completion script")
        }
        Cmd::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .context("cannot write the manual page"),
    }
}

/// Returned by a command that already told the user what went wrong (on stderr, or as JSON on
/// stdout): `main` exits 1 without a second message.
#[derive(Debug)]
pub(crate) struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reported")
    }
}

impl std::error::Error for Reported {}

/// An error and its causes, each said once (see [`mayfly_ca::report::report`]).
fn report(e: &anyhow::Error) -> String {
    mayfly_ca::report::report(e.as_ref())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Reported>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}
