//! mayfly's sidecar: terminates and originates mTLS with SPIFFE identities, authorizes every
//! connection by policy, rotates its SVID by itself, and never lets a connection outlive the
//! peer's credential or the policy that admitted it.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod config;
pub mod conn;
pub mod follow;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod ready;
pub mod register;
pub mod retry;
pub mod splice;
pub mod upstreams;
pub mod user;
pub mod workload_api;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{Semaphore, watch};
use tracing::info;

use crate::config::Config;
use crate::conn::Shared;
use crate::conn::listen::{BindError, Held, open_when_ready, reserve};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::policy::PolicyState;
use crate::ready::Readiness;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The initial policy file is invalid.
    #[error("policy: {0}")]
    Policy(#[from] policy::LoadError),
    /// The audit spool cannot be opened.
    #[error(transparent)]
    Audit(#[from] audit::SpoolError),
    /// The control plane address is unusable.
    #[error("control plane: {0}")]
    ControlPlane(#[from] mayfly_ca::client::ClientError),
    /// An inbound's `advertise` cannot be made an address (an environment variable unset).
    #[error("{0}")]
    Advertise(String),
    /// The Workload API socket cannot be opened.
    #[error(transparent)]
    WorkloadApi(#[from] workload_api::BindError),
}

/// A started sidecar.
pub struct Running {
    /// The admin listener's address.
    pub admin_addr: SocketAddr,
    /// The first inbound listener's address.
    pub inbound_addr: Option<SocketAddr>,
    /// Every inbound listener's address, in configuration order.
    pub inbound_addrs: Vec<SocketAddr>,
    /// Each outbound upstream's local address, by name.
    pub outbound_addrs: Vec<(String, SocketAddr)>,
    /// The identity.
    pub identity: Arc<Identity>,
    /// The policy.
    pub policy: Arc<PolicyState>,
    /// The audit stream: an embedding program can record events of its own in the chain.
    pub audit: Arc<audit::Auditor>,
    stop_accepting: watch::Sender<bool>,
    registration: Option<register::Registration>,
    hard_stop: watch::Sender<bool>,
    failed: watch::Receiver<Option<String>>,
    slots: Arc<Semaphore>,
    max_connections: usize,
    drain: std::time::Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// `a,b,c`.
fn listed(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(",")
}

/// Loads the policy, binds every listener (errors surface before anything runs), then spawns
/// the identity, policy, admin and proxy tasks. The admin listener listens at once; the
/// inbound and outbound listeners only once the sidecar is ready (see [`ready`]).
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let policy = PolicyState::new(cfg.policy_file.clone(), metrics.clone());
    policy.load_file()?;
    if cfg.policy_file.is_none() {
        tracing::info!(
            "no [policy] file: following the control plane's policy; the listeners open when the first snapshot arrives"
        );
    }
    let identity = Identity::new(
        cfg.spiffe_id.clone(),
        cfg.control_plane.clone(),
        metrics.clone(),
    )?;
    let admin = reserve("admin", cfg.admin)?.listen()?;
    let workload_socket = cfg
        .workload_api
        .as_ref()
        .map(workload_api::bind)
        .transpose()?;
    let held = Held::reserve(&cfg.inbound, &cfg.outbound)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (hard_tx, hard_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(cfg.limits.max_connections));
    // One client, shared: renewal, the watch, audit delivery and registration fail over together.
    let ca_client = identity.client().clone();
    let (auditor, audit_task) = audit::start(
        cfg.audit.clone(),
        identity.clone(),
        Some(ca_client.clone()),
        metrics.clone(),
        hard_rx.clone(),
    )?;
    let upstreams = upstreams::Upstreams::new(&cfg.outbound, metrics.clone());
    let shared = Arc::new(Shared {
        identity: identity.clone(),
        policy: policy.clone(),
        metrics: metrics.clone(),
        limits: cfg.limits.clone(),
        draining: stop_rx.clone(),
        hard_stop: hard_rx,
        slots: slots.clone(),
        audit: auditor.clone(),
        upstreams: upstreams.clone(),
    });
    let mut tasks = vec![audit_task];
    let admin_addr = admin.local_addr().unwrap_or(cfg.admin);
    let readiness = Readiness {
        identity: identity.clone(),
        policy: policy.clone(),
        audit: auditor.clone(),
    };
    tasks.push(tokio::spawn(admin::serve(
        Arc::new(admin::AdminState {
            ready: readiness.clone(),
            metrics: metrics.clone(),
            upstreams: upstreams.clone(),
        }),
        admin,
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(upstreams.clone().resolve(stop_rx.clone())));
    tasks.push(tokio::spawn(identity.clone().maintain(stop_rx.clone())));
    tasks.push(tokio::spawn(
        identity.clone().refresh_bundles(stop_rx.clone()),
    ));
    if let (Some(wl), Some(listener)) = (cfg.workload_api.clone(), workload_socket) {
        let parts = workload_api::Parts {
            identity: identity.clone(),
            client: mayfly_ca::client::CaClient::new(
                cfg.control_plane.address.clone(),
                cfg.spiffe_id.trust_domain().clone(),
            )?,
            ttl: cfg.control_plane.svid_ttl,
            audit: auditor.clone(),
            metrics: metrics.clone(),
        };
        tasks.extend(workload_api::start(wl, listener, parts, stop_rx.clone()));
    }
    tasks.push(tokio::spawn(policy.clone().watch_file(stop_rx.clone())));
    tasks.push(tokio::spawn(policy.clone().grant_clock(stop_rx.clone())));
    if cfg.policy_file.is_none() {
        tasks.push(tokio::spawn(policy.clone().follow_control_plane(
            identity.clone(),
            ca_client.clone(),
            upstreams.clone(),
            stop_rx.clone(),
        )));
    } else if !cfg.outbound.is_empty() {
        tasks.push(tokio::spawn(upstreams.clone().follow(
            identity.clone(),
            ca_client.clone(),
            stop_rx.clone(),
        )));
    }
    let inbound_addrs = held.inbound_addrs();
    let inbound_addr = inbound_addrs.first().copied();
    let mut advertised = Vec::new();
    for (i, bound) in cfg.inbound.iter().zip(&inbound_addrs) {
        match i
            .advertised(*bound, |k| std::env::var(k).ok())
            .map_err(StartError::Advertise)?
        {
            Some(a) => advertised.push(a),
            None => tracing::warn!(
                listen = %i.listen,
                "inbound listener on a wildcard address without `advertise`: not registered with the control plane, so peers cannot find it by SPIFFE ID (set inbound.advertise = \"HOST:PORT\")"
            ),
        }
    }
    let registration = (!advertised.is_empty())
        .then(|| register::Registration::start(ca_client, readiness.clone(), advertised));
    let outbound_addrs = held.outbound_addrs();
    let (failed_tx, failed) = watch::channel(None);
    tasks.push(tokio::spawn(open_when_ready(
        readiness,
        held,
        shared,
        stop_rx.clone(),
        failed_tx,
    )));
    // Display values only: no `Some(..)` or `[(..)]` Rust syntax in the logs.
    let inbound_shown = match inbound_addrs.as_slice() {
        [] => "none".to_owned(),
        a => listed(a.iter().map(|a| a.to_string())),
    };
    let outbound_shown = listed(outbound_addrs.iter().map(|(n, a)| format!("{n}={a}")));
    info!(spiffe_id = %cfg.spiffe_id, admin = %admin_addr, inbound = %inbound_shown, outbound = %outbound_shown, "sidecar started");
    Ok(Running {
        admin_addr,
        inbound_addr,
        inbound_addrs,
        outbound_addrs,
        identity,
        policy,
        audit: auditor,
        stop_accepting: stop_tx,
        registration,
        hard_stop: hard_tx,
        failed,
        slots,
        max_connections: cfg.limits.max_connections,
        drain: cfg.limits.drain_timeout,
        tasks,
    })
}

impl Running {
    /// Resolves with the reason if a listener could not be opened once the sidecar was ready
    /// (its port was taken in between): the sidecar cannot serve and should exit.
    pub async fn failed(&self) -> String {
        let mut rx = self.failed.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// Graceful shutdown: leave the endpoint registry (peers stop choosing this sidecar), stop
    /// accepting, wait for open connections up to the drain timeout, then end the rest.
    pub async fn shutdown(mut self) {
        if let Some(r) = self.registration.take() {
            r.deregister().await;
        }
        let _ = self.stop_accepting.send(true);
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(self.drain, self.slots.acquire_many(all)).await;
        if drained.is_err() {
            info!("drain deadline passed: closing the remaining connections");
        }
        let _ = self.hard_stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
