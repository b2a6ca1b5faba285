//! The `mayfly-ca` command line: the argument grammar ([`Cli`]), [`dispatch`] to one module per
//! command family, and the helpers they share.
//!
//! `run` (the control plane) is in [`run`]; the offline commands on a data directory in
//! [`ca`] (`init`, `bundle`, `ca status`) and [`svid`] (`svid mint`); the commands through
//! the running control plane's admin socket in [`token`], [`grant`] and [`endpoints`]; [`audit`] reads the
//! audit trail and [`policy`] checks policy files.

mod audit;
mod ca;
mod endpoints;
mod grant;
mod policy;
mod replay;
mod run;
mod store;
mod svid;
mod token;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use mayfly_ca::duration::parse_duration;
use mayfly_ca::server;
use mayfly_ca::server::admin::{self, AdminRequest};
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "mayfly-ca",
    version,
    about = "mayfly control plane: SPIFFE CA, join tokens, policy, audit"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct DataDirArg {
    /// The control plane's data directory.
    #[arg(long, env = "MAYFLY_DATA_DIR")]
    data_dir: PathBuf,
    #[command(flatten)]
    store: StoreArg,
}

impl DataDirArg {
    /// Opens the store and its authorities.
    fn open(
        &self,
    ) -> Result<(
        server::DataDir,
        std::sync::Arc<dyn mayfly_ca::store::Store>,
        mayfly_ca::authority::Authorities,
    )> {
        self.store.open(&self.data_dir)
    }
}

/// Where the store is, and the key-encryption key for CA keys in a shared database.
#[derive(Args, Clone)]
pub(crate) struct StoreArg {
    /// The store: `sqlite:PATH`, or `postgres://USER:PASSWORD@HOST:PORT/DB` (add
    /// `?sslmode=verify-full&sslrootcert=CA.pem` for TLS; prefer the environment variable to
    /// keep the password out of the process list). Default: ca.db in the data directory.
    #[arg(long = "store", env = "MAYFLY_STORE", hide_env_values = true)]
    store: Option<String>,
    /// The key-encryption key that seals CA private keys in a PostgreSQL store (0600;
    /// created by `init` when absent; every replica needs the same one). Default: ca.kek in
    /// the data directory.
    #[arg(long, env = "MAYFLY_KEK_FILE")]
    kek_file: Option<PathBuf>,
}

impl StoreArg {
    /// The store options these flags give.
    pub(crate) fn options(&self) -> Result<server::StoreOptions> {
        let url = self
            .store
            .as_deref()
            .map(str::parse::<mayfly_ca::store::StoreUrl>)
            .transpose()
            .context("--store")?;
        if self.kek_file.is_some() && !matches!(url, Some(mayfly_ca::store::StoreUrl::Postgres(_)))
        {
            anyhow::bail!("--kek-file applies to a PostgreSQL store (--store postgres://...) only");
        }
        Ok(server::StoreOptions {
            url,
            kek_file: self.kek_file.clone(),
        })
    }

    /// Opens the store and its authorities.
    pub(crate) fn open(
        &self,
        data_dir: &std::path::Path,
    ) -> Result<(
        server::DataDir,
        std::sync::Arc<dyn mayfly_ca::store::Store>,
        mayfly_ca::authority::Authorities,
    )> {
        Ok(server::open_with(data_dir, &self.options()?)?)
    }
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
    Run(Box<run::RunArgs>),
    /// SVIDs for workloads outside the mesh.
    #[command(subcommand)]
    Svid(svid::SvidCmd),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(ca::BundleCmd),
    /// The CA authorities.
    #[command(subcommand)]
    Ca(ca::CaCmd),
    /// Join tokens (through the running control plane's admin socket).
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Policy files: validate and explain.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// The audit trail: tail, query, verify.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Just-in-time grants: request, approve, deny, revoke, list.
    #[command(subcommand)]
    Grant(grant::GrantCmd),
    /// The sidecars' registered endpoints (through the admin socket).
    #[command(subcommand)]
    Endpoints(endpoints::EndpointsCmd),
    /// The store itself: copy an SQLite store into PostgreSQL.
    #[command(subcommand)]
    Store(store::StoreCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on standard output.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on standard output: `mayfly-ca man | man -l -`.
    Man,
}

/// Runs one command.
pub(crate) async fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init {
            dir,
            trust_domain,
            root_ttl,
            intermediate_ttl,
            exist_ok,
        } => ca::init(&dir, &trust_domain, root_ttl, intermediate_ttl, exist_ok),
        Cmd::Run(args) => run::run(*args).await,
        Cmd::Svid(cmd) => svid::run(cmd),
        Cmd::Bundle(cmd) => ca::bundle(cmd),
        Cmd::Ca(cmd) => ca::status(cmd),
        Cmd::Token(cmd) => token::run(cmd).await,
        Cmd::Policy(cmd) => policy::run(cmd),
        Cmd::Audit(cmd) => audit::run(cmd).await,
        Cmd::Grant(cmd) => grant::run(cmd).await,
        Cmd::Endpoints(cmd) => endpoints::run(cmd).await,
        Cmd::Store(cmd) => store::run(cmd),
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

/// The command ran, printed its result, and chose its exit status (`policy replay`: 1 when
/// something would change, 2 on an error it has printed).
#[derive(Debug)]
pub(crate) struct ExitWith(pub(crate) u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reported")
    }
}

impl std::error::Error for Reported {}

/// A Unix time as RFC 3339 (the number itself if it is out of range).
fn when(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Where the running control plane's admin socket is: `admin.sock` in its data directory, or
/// the path `mayfly-ca run --admin-socket` bound it at (how an admin who cannot enter the data
/// directory reaches it).
#[derive(Args, Clone)]
pub(crate) struct AdminArg {
    /// The control plane's data directory (for its admin socket).
    #[arg(
        long,
        env = "MAYFLY_DATA_DIR",
        required_unless_present = "admin_socket"
    )]
    data_dir: Option<PathBuf>,
    /// The admin socket, where `mayfly-ca run --admin-socket` put it (instead of
    /// `--data-dir`).
    #[arg(long, env = "MAYFLY_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
}

impl AdminArg {
    fn socket(&self) -> PathBuf {
        match (&self.admin_socket, &self.data_dir) {
            (Some(s), _) => s.clone(),
            (None, Some(d)) => d.join(server::datadir::ADMIN_SOCKET),
            // clap requires one of the two.
            (None, None) => PathBuf::from(server::datadir::ADMIN_SOCKET),
        }
    }
}

/// One request on the running control plane's admin socket.
async fn admin_call(to: &AdminArg, req: AdminRequest) -> Result<Value> {
    admin::call(&to.socket(), &req)
        .await
        .map_err(anyhow::Error::msg)
}
