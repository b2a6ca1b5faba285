//! The control plane (feature `server`): `mayfly-ca run` and the offline commands that work on
//! a data directory. This file starts and opens it; the pieces, lowest first:
//!
//! - [`store`]: the persistent state behind the `Store` trait, and its SQLite implementation.
//!   It sits under `server/` (not beside it) because only the control plane has a store; the
//!   old path `mayfly_ca::store` is re-exported from the crate root.
//! - [`datadir`] (the data directory's files), [`metrics`], [`attest`] (Kubernetes
//!   service-account tokens), [`policy`] (the policy in force and the change generation).
//! - [`ca`]: the control plane's state (`Ca`: authorities, issuance, tokens, what it owes its
//!   audit chain), built on the modules above.
//! - On top of `ca`: [`distribution`] (grants, and the snapshots pushed on `GET /v1/watch`),
//!   [`audit`] (ingest, the control plane's own chain, verification), [`http`] (the API) and
//!   [`admin`] (the admin socket), and [`console`] (the read-only web console).
//!
//! No module refers to a sibling above it; where a piece was needed both ways it moved down
//! (the `Distribution` type into `policy`, `Pending` into `ca`, `CaSettings`' default, which
//! takes the API listener's connection limit, into this file).

pub mod access;
#[cfg(test)]
mod access_tests;
pub mod admin;
pub mod attest;
pub mod audit;
pub mod ca;
pub mod console;
pub mod datadir;
pub mod distribution;
pub mod http;
pub mod metrics;
pub mod migrate;
pub mod oidc;
pub mod policy;
pub mod registry;
pub mod replay;
pub mod store;
pub mod sync;
mod tasks;
#[cfg(test)]
mod tests;
pub mod user_api;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::identity::bundle::{DEFAULT_REFRESH_HINT, TrustBundle};
use crate::identity::duration::format_duration;
use crate::identity::signing::authority::{Authorities, AuthorityConfig};
use crate::server::store::{Kek, SqliteStore, Store, StoreError, StoreUrl};
pub use ca::{Ca, CaSettings};
pub use datadir::DataDir;

/// Why the control plane could not start or a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Data directory problem.
    #[error(transparent)]
    DataDir(#[from] datadir::DataDirError),
    /// Store problem.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Authority problem.
    #[error(transparent)]
    Authority(#[from] crate::identity::signing::authority::AuthorityError),
    /// Cannot bind a listener.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// What was bound.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The policy file cannot be loaded.
    #[error("{0}")]
    Policy(policy::PolicyFileError),
    /// The trust domain given to `init` is not valid.
    #[error("{0}")]
    TrustDomain(crate::identity::id::IdError),
    /// The authorities make no valid trust bundle.
    #[error("{0}")]
    Bundle(crate::identity::bundle::BundleError),
    /// The control plane's state could not be set up (rotation, its own SVID).
    #[error("{0}")]
    Start(ca::Refusal),
    /// The key-encryption key file cannot be used.
    #[error(transparent)]
    Kek(#[from] store::kek::KekError),
    /// The console's settings are refused.
    #[error(transparent)]
    Console(console::ConsoleError),
    /// `init` on a store that already holds a CA.
    #[error("{0} already holds a mayfly CA: refusing to overwrite it")]
    AlreadyInitialised(String),
}

impl ServerError {
    /// Whether the store holds no CA yet (or the KEK `init` creates is not there yet): what
    /// `init --exist-ok` proceeds on.
    pub fn is_not_initialised(&self) -> bool {
        matches!(
            self,
            ServerError::DataDir(datadir::DataDirError::NotInitialised(_))
                | ServerError::Store(StoreError::NotInitialised)
                | ServerError::Kek(store::kek::KekError::Missing(_))
        )
    }
}

/// Where the store is (`--store`) and the KEK that seals CA keys in PostgreSQL (`--kek-file`).
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// The store; `None` for `ca.db` in the data directory.
    pub url: Option<StoreUrl>,
    /// The KEK file (PostgreSQL only); `None` for `ca.kek` in the data directory.
    pub kek_file: Option<PathBuf>,
}

/// The KEK file in the data directory when `--kek-file` is not given.
pub const KEK_FILE: &str = "ca.kek";

impl StoreOptions {
    fn kek_path(&self, dir: &Path) -> PathBuf {
        self.kek_file.clone().unwrap_or_else(|| dir.join(KEK_FILE))
    }
}

/// Settings read from the store that `init` fixed.
fn authority_config(store: &dyn Store) -> Result<AuthorityConfig, ServerError> {
    let d = AuthorityConfig::default();
    let get = |k: &str, dflt: Duration| -> Result<Duration, ServerError> {
        Ok(store
            .setting(k)?
            .and_then(|s| s.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(dflt))
    };
    Ok(AuthorityConfig {
        root_ttl: get("root_ttl", d.root_ttl)?,
        intermediate_ttl: get("intermediate_ttl", d.intermediate_ttl)?,
    })
}

/// Opens the SQLite store in a data directory and its authorities (tests that need the
/// concrete store; commands use [`open_with`]).
pub fn open(dir: &Path) -> Result<(DataDir, Arc<SqliteStore>, Authorities), ServerError> {
    let dd = DataDir::open(dir)?;
    let store = Arc::new(SqliteStore::open(&dd.db_path())?);
    let cfg = authority_config(store.as_ref())?;
    let auth = store
        .load_authorities(cfg)?
        .ok_or_else(|| datadir::DataDirError::NotInitialised(dir.to_path_buf()))?;
    Ok((dd, store, auth))
}

/// Opens the store `opts` names and its authorities; the data directory holds what is not in
/// the database (the admin socket, by default the KEK). The one place a store is opened.
pub fn open_with(
    dir: &Path,
    opts: &StoreOptions,
) -> Result<(DataDir, Arc<dyn Store>, Authorities), ServerError> {
    let (dd, store): (DataDir, Arc<dyn Store>) = match &opts.url {
        None => {
            let dd = DataDir::open(dir)?;
            let store = Arc::new(SqliteStore::open(&dd.db_path())?);
            (dd, store)
        }
        Some(StoreUrl::Sqlite(path)) => {
            let dd = DataDir::ensure(dir)?;
            if !path.exists() {
                return Err(StoreError::NotInitialised.into());
            }
            (dd, store::open(&StoreUrl::Sqlite(path.clone()), None)?)
        }
        Some(url @ StoreUrl::Postgres(u)) => {
            let dd = DataDir::ensure(dir)?;
            match Kek::load(&opts.kek_path(dir)) {
                Ok(kek) => (dd, store::open(url, Some(kek))?),
                Err(e @ store::kek::KekError::Missing(_)) => {
                    // A bad URL, an unreachable server or a newer schema says more than a
                    // missing KEK: connect first (no key is read without one).
                    drop(store::PostgresStore::open(u, Kek::generate())?);
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let cfg = authority_config(store.as_ref())?;
    let auth = store.load_authorities(cfg)?.ok_or_else(|| {
        if opts.url.is_none() {
            ServerError::DataDir(datadir::DataDirError::NotInitialised(dir.to_path_buf()))
        } else {
            ServerError::Store(StoreError::NotInitialised)
        }
    })?;
    Ok((dd, store, auth))
}

/// Writes a new CA into an empty store: its settings, then the authorities (which make it
/// initialised), then its first event.
fn fill(store: &dyn Store, a: &Authorities, config: AuthorityConfig) -> Result<(), ServerError> {
    store.set_setting("root_ttl", &config.root_ttl.as_secs().to_string())?;
    store.set_setting(
        "intermediate_ttl",
        &config.intermediate_ttl.as_secs().to_string(),
    )?;
    store.save_authorities(a)?;
    store.append_event(
        OffsetDateTime::now_utc(),
        "ca.init",
        &json!({ "trust_domain": a.trust_domain().as_str() }).to_string(),
    )?;
    Ok(())
}

/// `mayfly-ca init --store URL`: a new CA in the store `opts` names. With PostgreSQL the KEK
/// file is created (0600) when absent, and CA keys are sealed under it.
pub fn init_with(
    dir: &Path,
    trust_domain: &str,
    config: AuthorityConfig,
    opts: &StoreOptions,
) -> Result<Authorities, ServerError> {
    let url = match &opts.url {
        None => return init(dir, trust_domain, config),
        Some(url) => url,
    };
    let td =
        crate::identity::id::parse_trust_domain(trust_domain).map_err(ServerError::TrustDomain)?;
    DataDir::ensure(dir)?;
    let a = Authorities::init(td, config, OffsetDateTime::now_utc())?;
    match url {
        StoreUrl::Sqlite(path) => {
            if path.exists() {
                return Err(ServerError::AlreadyInitialised(path.display().to_string()));
            }
            datadir::write_secret(path, b"").map_err(|source| datadir::DataDirError::Io {
                path: path.clone(),
                source,
            })?;
            let filled = SqliteStore::open(path)
                .map_err(ServerError::from)
                .and_then(|s| fill(&s, &a, config));
            if filled.is_err() {
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    let _ = std::fs::remove_file(p);
                }
            }
            filled?;
        }
        StoreUrl::Postgres(u) => {
            let kek_path = opts.kek_path(dir);
            let (kek, created) = Kek::load_or_create(&kek_path)?;
            let filled = (|| {
                let store = store::PostgresStore::open(u, kek)?;
                if store.trust_domain()?.is_some() {
                    return Err(ServerError::AlreadyInitialised(format!(
                        "the PostgreSQL database at {}",
                        store.target()
                    )));
                }
                fill(&store, &a, config)
            })();
            if filled.is_err() && created {
                let _ = std::fs::remove_file(&kek_path); // it sealed nothing
            }
            filled?;
        }
    }
    Ok(a)
}

/// `mayfly-ca init`: creates the data directory, the root and the first intermediate.
pub fn init(
    dir: &Path,
    trust_domain: &str,
    config: AuthorityConfig,
) -> Result<Authorities, ServerError> {
    let td =
        crate::identity::id::parse_trust_domain(trust_domain).map_err(ServerError::TrustDomain)?;
    // Built under a temporary name and named `ca.db` last: a failure anywhere leaves nothing.
    let pending = DataDir::create(dir)?;
    let a = Authorities::init(td, config, OffsetDateTime::now_utc())?;
    {
        let store = SqliteStore::open(pending.db_path())?;
        fill(&store, &a, config)?;
    } // closed (its WAL checkpointed) before the file takes its name
    pending.commit()?;
    Ok(a)
}

/// The current bundle of an authority set.
pub fn bundle_of(a: &Authorities) -> Result<TrustBundle, ServerError> {
    TrustBundle::new(
        a.trust_domain().clone(),
        a.bundle_roots(OffsetDateTime::now_utc()),
        a.bundle_sequence(),
        DEFAULT_REFRESH_HINT,
    )
    .map(|b| b.with_jwt_keys(a.bundle_jwt_keys(OffsetDateTime::now_utc())))
    .map_err(ServerError::Bundle)
}

/// Authorities as JSON for `ca status`.
pub fn status_json(a: &Authorities) -> serde_json::Value {
    let now = OffsetDateTime::now_utc();
    let list: Vec<_> = a
        .all()
        .iter()
        .map(|x| {
            let left = x.not_after - now;
            json!({
                "id": x.id,
                "role": x.role.to_string(),
                "state": x.state.to_string(),
                "subject": crate::identity::svid::subject(&x.cert).unwrap_or_default(),
                "not_before": x.not_before.unix_timestamp(),
                "not_after": x.not_after.unix_timestamp(),
                "expires_in": format_duration(Duration::from_secs(left.whole_seconds().max(0) as u64)),
                "parent": x.parent,
            })
        })
        .collect();
    json!({
        "trust_domain": a.trust_domain().as_str(),
        "bundle_sequence": a.bundle_sequence(),
        "next_change_at": a.next_change_at(now).unix_timestamp(),
        "authorities": list,
    })
}

/// Options of `mayfly-ca run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Data directory.
    pub data_dir: PathBuf,
    /// API listener.
    pub listen: SocketAddr,
    /// Plain-HTTP listener for `/metrics` and `/healthz` (loopback by default).
    pub metrics_listen: Option<SocketAddr>,
    /// Settings.
    pub settings: CaSettings,
    /// How long to drain connections on shutdown.
    pub drain: Duration,
    /// The policy file to distribute to sidecars (`--policy`).
    pub policy_file: Option<PathBuf>,
    /// Where the admin socket is bound (`--admin-socket`); default `admin.sock` in the data
    /// directory.
    pub admin_socket: Option<PathBuf>,
    /// The group whose members may connect to the admin socket (`--admin-group`); default none.
    pub admin_group: Option<u32>,
    /// Where the store is (`--store`, `--kek-file`); default `ca.db` in the data directory.
    pub store: StoreOptions,
    /// The web console (`--ui-listen`), or `None` for none.
    pub console: Option<console::ConsoleOptions>,
}

/// What a started control plane exposes to its caller (tests, the binary).
pub struct Running {
    /// The API address actually bound.
    pub api_addr: SocketAddr,
    /// The metrics address actually bound.
    pub metrics_addr: Option<SocketAddr>,
    /// The console's address actually bound.
    pub console_addr: Option<SocketAddr>,
    /// The control plane.
    pub ca: Arc<Ca>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, drains, and waits for every task; then anchors what was delivered
    /// since the last anchor and signs a last checkpoint of the control plane's own chain.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let ca = self.ca.clone();
        let _ = tokio::task::spawn_blocking(move || audit::settle(&ca)).await;
    }
}

/// Starts the control plane: binds every listener (errors surface here, before anything
/// runs), then spawns the API, admin socket, metrics and rotation tasks.
pub async fn start(opts: RunOptions) -> Result<Running, ServerError> {
    if let Some(c) = &opts.console {
        c.check().map_err(ServerError::Console)?;
    }
    let (dd, store, authorities) = open_with(&opts.data_dir, &opts.store)?;
    // Read before any shared state is loaded: whatever other replicas change after it is
    // taken by the follower.
    let baseline = store.changes()?;
    let dist =
        distribution::Distribution::new(opts.policy_file.clone()).map_err(ServerError::Policy)?;
    let ca = Ca::start(store, authorities, opts.settings.clone(), dist.clone())
        .map_err(ServerError::Start)?;
    sync::start(&ca)?;
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: opts.listen.to_string(),
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: opts.listen.to_string(),
        source,
    })?;
    let admin_path = opts
        .admin_socket
        .clone()
        .unwrap_or_else(|| dd.admin_socket());
    let admin = admin::bind(&admin_path, opts.admin_group).map_err(|source| ServerError::Bind {
        addr: admin_path.display().to_string(),
        source,
    })?;
    let metrics_listener = match opts.metrics_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: a.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let console_listener = match &opts.console {
        Some(c) => match TcpListener::bind(c.listen).await {
            Ok(l) => Some((l, c.clone())),
            // The default address taken (another control plane on this machine): run without.
            Err(e) if !c.must_bind => {
                tracing::warn!(addr = %c.listen, error = %e, "the console's default address is taken: no console (--ui-listen ADDR to choose one)");
                None
            }
            Err(source) => {
                return Err(ServerError::Bind {
                    addr: c.listen.to_string(),
                    source,
                });
            }
        },
        None => None,
    };
    let console_addr = console_listener
        .as_ref()
        .and_then(|(l, _)| l.local_addr().ok());
    let (tx, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(http::serve(
        ca.clone(),
        listener,
        rx.clone(),
        opts.drain,
    )));
    tasks.push(tokio::spawn(admin::serve(ca.clone(), admin, rx.clone())));
    if let Some(l) = metrics_listener {
        tasks.push(tokio::spawn(tasks::serve_metrics(
            ca.clone(),
            l,
            rx.clone(),
        )));
    }
    if let Some((l, c)) = console_listener {
        tasks.push(tokio::spawn(console::serve(ca.clone(), l, c, rx.clone())));
    }
    tasks.push(tokio::spawn(
        dist.clone().watch_file(ca.clone(), rx.clone()),
    ));
    tasks.push(tokio::spawn(distribution::expiry_events(
        ca.clone(),
        dist.clone(),
        rx.clone(),
    )));
    tasks.push(tokio::spawn(tasks::keep_audit(ca.clone(), rx.clone())));
    tasks.push(tokio::spawn(tasks::sweep_endpoints(ca.clone(), rx.clone())));
    tasks.push(tokio::spawn(sync::follow(ca.clone(), baseline, rx.clone())));
    tasks.push(tokio::spawn(tasks::maintain(ca.clone(), rx)));
    info!(api = %api_addr, trust_domain = %ca.bundle().trust_domain(), id = %ca.ca_id(), "control plane started");
    Ok(Running {
        api_addr,
        metrics_addr,
        console_addr,
        ca,
        shutdown: tx,
        tasks,
    })
}

/// `mayfly-ca store rekey`: opens the CA keys in the PostgreSQL store at `url` with `old`
/// and seals them again under `new`, in one transaction (every replica must then run with
/// the new KEK file); records `kek.rotated` on the control plane's chain. Returns how many
/// keys were sealed again.
pub fn rekey(url: &str, old: Kek, new: Kek) -> Result<usize, ServerError> {
    let from = store::PostgresStore::open(url, old)?;
    let cfg = authority_config(&from)?;
    let auth = from
        .load_authorities(cfg)?
        .ok_or(ServerError::Store(StoreError::NotInitialised))?;
    drop(from);
    let to = store::PostgresStore::open(url, new)?;
    to.save_authorities(&auth)?;
    // Read back under the new KEK before saying it is done.
    to.load_authorities(cfg)?
        .ok_or(ServerError::Store(StoreError::NotInitialised))?;
    let n = auth.all().len();
    let detail = serde_json::json!({ "keys": n }).to_string();
    to.append_event(OffsetDateTime::now_utc(), "kek.rotated", &detail)?;
    Ok(n)
}
