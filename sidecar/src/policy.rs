//! The policy in force: loaded from a file (standalone mode), checked on every change, swapped
//! atomically. A bad new file is refused and logged; the last good policy stays in force.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use mayfly_policy::{Decision, Engine, Policy, Request};
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::audit::{Field, FieldList};
use crate::metrics::{Metrics, ResultLabels};

/// How often the policy file is checked for changes.
pub const POLL: Duration = Duration::from_secs(1);

/// The compiled policy in force and a generation counter that ticks on every change.
pub struct PolicyState {
    engine: ArcSwapOption<Engine>,
    /// Live JIT grants (expiry is enforced by this sidecar's own clock).
    grants: arc_swap::ArcSwap<Vec<mayfly_policy::Grant>>,
    generation: watch::Sender<u64>,
    file: Option<PathBuf>,
    metrics: Arc<Metrics>,
    /// Grants of the last snapshot refused as unparseable (each is logged and counted once).
    rejected: std::sync::Mutex<Vec<String>>,
}

/// Why a file was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Unreadable.
    #[error("cannot read policy file {0}: {1}")]
    Read(String, std::io::Error),
    /// Invalid (every diagnostic, one per line).
    #[error("{0}")]
    Invalid(String),
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    mayfly_ca::keys::fill_random(&mut b);
    u64::from_le_bytes(b)
}

impl PolicyState {
    /// A state with no policy (everything is denied until one loads).
    pub fn new(file: Option<PathBuf>, metrics: Arc<Metrics>) -> Arc<Self> {
        let (generation, _) = watch::channel(0);
        Arc::new(Self {
            engine: ArcSwapOption::empty(),
            grants: arc_swap::ArcSwap::from_pointee(Vec::new()),
            generation,
            file,
            metrics,
            rejected: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Whether a policy is loaded.
    pub fn loaded(&self) -> bool {
        self.engine.load().is_some()
    }

    /// The version of the policy in force.
    pub fn version(&self) -> Option<String> {
        self.engine.load().as_ref().map(|e| e.version().to_string())
    }

    /// Whether a grant with this id is live in this sidecar.
    pub fn has_grant(&self, id: &str) -> bool {
        self.grants.load().iter().any(|g| g.id == id)
    }

    /// A receiver that sees every policy change.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Installs a parsed policy.
    pub fn install(&self, policy: &Policy) {
        let engine = Engine::with_seed(policy, seed());
        info!(version = %engine.version(), rules = policy.rules().len(), "policy in force");
        self.engine.store(Some(Arc::new(engine)));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Reads, validates and installs the file. On error the policy in force is unchanged.
    pub fn load_file(&self) -> Result<(), LoadError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let name = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| LoadError::Read(name.clone(), e))?;
        match Policy::from_toml_at(&src, &name, OffsetDateTime::now_utc()) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    warn!("{w}");
                }
                if self.version().as_deref() != Some(loaded.policy.version()) {
                    self.install(&loaded.policy);
                }
                Ok(())
            }
            Err(e) => Err(LoadError::Invalid(e.to_string())),
        }
    }

    /// Installs a snapshot pushed by the control plane: its policy (when it changed) and its
    /// grants. A snapshot whose policy does not parse is refused whole.
    pub fn install_snapshot(&self, snap: &mayfly_ca::api::Snapshot) -> Result<(), LoadError> {
        let mut changed = false;
        if let (Some(src), Some(v)) = (&snap.policy, &snap.policy_version)
            && self.version().as_deref() != Some(v.as_str())
        {
            let loaded = Policy::from_toml(src, "control-plane policy")
                .map_err(|e| LoadError::Invalid(e.to_string()))?;
            let engine = Engine::with_seed(&loaded.policy, seed());
            info!(version = %engine.version(), "policy from the control plane in force");
            self.engine.store(Some(Arc::new(engine)));
            changed = true;
        }
        let mut grants = Vec::with_capacity(snap.grants.len());
        let mut rejected = Vec::new();
        for g in &snap.grants {
            let at = |t: i64| {
                OffsetDateTime::from_unix_timestamp(t).unwrap_or(OffsetDateTime::UNIX_EPOCH)
            };
            // A grant with a path this sidecar cannot parse applies to nothing: dropping only
            // the path would widen it to every path, and to raw connections.
            let paths: Result<Vec<_>, _> = g
                .paths
                .iter()
                .map(|p| mayfly_policy::PathPattern::parse(p).map_err(|e| (p, e)))
                .collect();
            let paths = match paths {
                Ok(p) => p,
                Err((path, e)) => {
                    if !self.rejected.lock().is_ok_and(|r| r.contains(&g.id)) {
                        warn!(grant = %g.id, path = %path, error = %e, "grant refused: a path does not parse; it applies to nothing");
                        self.metrics.grants_rejected.inc();
                    }
                    rejected.push(g.id.clone());
                    continue;
                }
            };
            grants.push(mayfly_policy::Grant {
                id: g.id.clone(),
                from: g.from.clone(),
                to: g.to.clone(),
                methods: g.methods.clone(),
                paths,
                not_before: at(g.not_before),
                expires: at(g.expires),
            });
        }
        if let Ok(mut r) = self.rejected.lock() {
            *r = rejected;
        }
        let old: Vec<String> = self.grants.load().iter().map(|g| g.id.clone()).collect();
        let new: Vec<String> = grants.iter().map(|g| g.id.clone()).collect();
        if old != new {
            info!(grants = %new.join(","), count = new.len(), "live grants updated");
            self.grants.store(Arc::new(grants));
            changed = true;
        }
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
        Ok(())
    }

    /// Re-checks open connections whenever a grant starts or ends, by this sidecar's clock:
    /// a grant ends on time even if the control plane is away.
    pub async fn grant_clock(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.generation.subscribe();
        loop {
            let now = OffsetDateTime::now_utc();
            let next = self
                .grants
                .load()
                .iter()
                .flat_map(|g| [g.not_before, g.expires])
                .filter(|t| *t > now)
                .min();
            let wait = next
                .map(|t| Duration::from_secs_f64((t - now).as_seconds_f64().max(0.0)))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {
                    info!("a grant started or ended: re-checking open connections");
                    self.generation.send_modify(|g| *g += 1);
                    let _ = changes.borrow_and_update();
                }
                r = changes.changed() => { if r.is_err() { return; } }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Follows the control plane's snapshots; keeps enforcing the last one while it is away.
    pub async fn follow_control_plane(
        self: Arc<Self>,
        identity: Arc<crate::identity::Identity>,
        client: mayfly_ca::client::CaClient,
        upstreams: Arc<crate::upstreams::Upstreams>,
        shutdown: watch::Receiver<bool>,
    ) {
        let ids = upstreams.ids();
        crate::follow::follow(
            identity,
            client,
            ids,
            shutdown,
            |snap| {
                upstreams.install(&snap.endpoints);
                let ok = match self.install_snapshot(snap) {
                    Ok(()) => true,
                    Err(e) => {
                        error!(in_force = self.version().as_deref().unwrap_or("none"), "policy from the control plane refused:\n{e}");
                        false
                    }
                };
                self.metrics.policy_reloads.get_or_create(&ResultLabels { result: if ok { "ok" } else { "error" }.into() }).inc();
            },
            |e, backoff| warn!(error = %e, retry_in_s = backoff.as_secs_f64(), in_force = self.version().as_deref().unwrap_or("none"), "policy watch interrupted; enforcing the last snapshot"),
        )
        .await;
    }

    /// Polls the file and reloads it when its content changes.
    pub async fn watch_file(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let mut last = std::fs::read(&path).ok();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.changed() => return,
            }
            let now = std::fs::read(&path).ok();
            if now == last {
                continue;
            }
            last = now;
            let ok = match self.load_file() {
                Ok(()) => true,
                Err(e) => {
                    error!(
                        in_force = self.version().as_deref().unwrap_or("none"),
                        "policy file refused; the last good policy stays in force:\n{e}"
                    );
                    false
                }
            };
            self.metrics
                .policy_reloads
                .get_or_create(&ResultLabels {
                    result: if ok { "ok" } else { "error" }.into(),
                })
                .inc();
        }
    }

    /// An L4 decision: may `source` open a connection to `destination`?
    /// Without a policy, the answer is a deny by default.
    pub fn decide_l4(
        &self,
        source: &str,
        destination: &str,
        port: Option<u16>,
        source_ip: Option<IpAddr>,
    ) -> Verdict {
        self.decide(source, destination, port, source_ip, None)
    }

    /// The decision on a connection (`http: None`) or on one request, by the policy in force.
    fn decide(
        &self,
        source: &str,
        destination: &str,
        port: Option<u16>,
        source_ip: Option<IpAddr>,
        http: Option<&HttpFacts<'_>>,
    ) -> Verdict {
        self.ask(
            source,
            destination,
            port,
            source_ip,
            http,
            |engine, req, grants| Verdict::Decided(engine.decide(req, grants)),
        )
        .unwrap_or(Verdict::NoPolicy)
    }

    /// Puts the request (as of now) to the engine in force with the live grants; `None`
    /// without a policy. Every decision and query builds its request here.
    fn ask<T>(
        &self,
        source: &str,
        destination: &str,
        port: Option<u16>,
        source_ip: Option<IpAddr>,
        http: Option<&HttpFacts<'_>>,
        f: impl FnOnce(&Engine, &Request<'_>, &[mayfly_policy::Grant]) -> T,
    ) -> Option<T> {
        let guard = self.engine.load();
        let engine = guard.as_ref()?;
        let req = Request {
            source,
            destination,
            port,
            source_ip,
            http: http.map(|h| mayfly_policy::HttpRequest {
                method: h.method,
                path: h.path,
                headers: h.headers,
            }),
            now: OffsetDateTime::now_utc(),
        };
        Some(f(engine, &req, &self.grants.load()))
    }
}

/// The HTTP part of a request decision.
pub struct HttpFacts<'a> {
    /// Method.
    pub method: &'a str,
    /// Normalised path.
    pub path: &'a str,
    /// Headers, names lowercase.
    pub headers: &'a [(&'a str, &'a str)],
}

impl PolicyState {
    /// A per-request decision.
    pub fn decide_http(
        &self,
        source: &str,
        destination: &str,
        port: Option<u16>,
        source_ip: Option<IpAddr>,
        http: &HttpFacts<'_>,
    ) -> Verdict {
        self.decide(source, destination, port, source_ip, Some(http))
    }

    /// Whether some rule could allow some HTTP request from `source` to `destination`: a
    /// connection nothing could ever allow is denied as a whole (one `connection.denied`
    /// record) and every request on it is answered 403 without being decided or forwarded.
    pub fn may_allow_any(
        &self,
        source: &str,
        destination: &str,
        port: Option<u16>,
        source_ip: Option<IpAddr>,
    ) -> bool {
        self.ask(
            source,
            destination,
            port,
            source_ip,
            None,
            |engine, req, grants| engine.may_allow_any(req, grants),
        )
        .unwrap_or(false)
    }
}

/// The outcome of a decision.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// No policy is loaded: default deny.
    NoPolicy,
    /// The engine decided.
    Decided(Decision),
}

impl Verdict {
    /// Whether the traffic may pass (allowed, or denied only in dry-run).
    pub fn permits(&self) -> bool {
        match self {
            Verdict::NoPolicy => false,
            Verdict::Decided(d) => d.permits(),
        }
    }

    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::NoPolicy => "deny",
            Verdict::Decided(d) if d.allow => "allow",
            Verdict::Decided(d) if !d.enforced => "dry_run_deny",
            Verdict::Decided(_) => "deny",
        }
    }

    /// The decision ID, for logs and error responses.
    pub fn decision_id(&self) -> &str {
        match self {
            Verdict::NoPolicy => "no-policy",
            Verdict::Decided(d) => &d.decision_id,
        }
    }

    /// Adds the decision's audit fields: `decision`, `enforced`, `rule` / `grant`,
    /// `decision_id`, `policy_version`.
    pub fn audit_into(&self, m: &mut serde_json::Map<String, serde_json::Value>) {
        let mut f = FieldList::with_capacity(6);
        self.audit_fields(&mut f);
        m.extend(f.into_map());
    }

    /// [`Verdict::audit_into`] for a record built as a [`FieldList`] (no key or shared value
    /// copied).
    pub fn audit_fields(&self, f: &mut FieldList) {
        match self {
            Verdict::NoPolicy => {
                f.insert("decision", Field::Static("deny"));
                f.insert("enforced", Field::Bool(true));
                f.insert("rule", Field::Static("no-policy"));
            }
            Verdict::Decided(d) => {
                f.insert(
                    "decision",
                    Field::Static(if d.allow { "allow" } else { "deny" }),
                );
                f.insert("enforced", Field::Bool(d.enforced));
                match &d.decided_by {
                    mayfly_policy::DecidedBy::Rule(r) => {
                        f.insert("rule", Field::Shared(r.clone()));
                    }
                    mayfly_policy::DecidedBy::Grant(g) => {
                        f.insert("grant", Field::Owned(g.clone()));
                    }
                    other => {
                        f.insert("rule", Field::Owned(format!("{other:?}").to_lowercase()));
                    }
                }
                if let Some(dr) = &d.dry_run {
                    f.insert(
                        "dry_run",
                        Field::Json(serde_json::json!({
                            "would": if dr.allow { "allow" } else { "deny" },
                            "rule": dr.rule.to_string(),
                        })),
                    );
                }
                f.insert("decision_id", Field::Owned(d.decision_id.clone()));
                f.insert("policy_version", Field::Shared(d.policy_version.clone()));
            }
        }
    }

    /// What decided it, for logs.
    pub fn by(&self) -> String {
        match self {
            Verdict::NoPolicy => "no policy loaded".into(),
            Verdict::Decided(d) => d.decided_by.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(id: &str, paths: &[&str]) -> mayfly_ca::api::GrantWire {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        mayfly_ca::api::GrantWire {
            id: id.into(),
            from: "spiffe://mayfly.local/web".into(),
            to: "spiffe://mayfly.local/orders".into(),
            methods: Vec::new(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            not_before: now - 60,
            expires: now + 600,
        }
    }

    fn snapshot(grants: Vec<mayfly_ca::api::GrantWire>) -> mayfly_ca::api::Snapshot {
        mayfly_ca::api::Snapshot {
            generation: 1,
            policy_version: None,
            policy: Some("version = 1\n".into()),
            grants,
            bundle: serde_json::Value::Null,
            endpoints: Default::default(),
        }
    }

    fn get(state: &PolicyState, path: &str) -> bool {
        state
            .decide_http(
                "spiffe://mayfly.local/web",
                "spiffe://mayfly.local/orders",
                Some(8080),
                None,
                &HttpFacts {
                    method: "GET",
                    path,
                    headers: &[],
                },
            )
            .permits()
    }

    #[test]
    fn a_grant_whose_path_does_not_parse_gives_no_access_at_l4_or_l7() {
        let metrics = Arc::new(Metrics::new());
        let state = PolicyState::new(None, metrics.clone());
        let mut snap = snapshot(vec![
            wire("g-bad", &["/a*b"]),
            wire("g-dots", &["/reports/..;/admin", "/ok"]),
        ]);
        snap.policy_version = Some("v1".into());
        state.install_snapshot(&snap).unwrap();
        let (web, orders) = ("spiffe://mayfly.local/web", "spiffe://mayfly.local/orders");
        assert!(!state.decide_l4(web, orders, Some(8080), None).permits());
        assert!(!state.may_allow_any(web, orders, Some(8080), None));
        assert!(!get(&state, "/ok") && !get(&state, "/admin"));
        assert!(!state.has_grant("g-bad") && !state.has_grant("g-dots"));
        assert_eq!(metrics.grants_rejected.get(), 2);
        // Counted once however often the control plane repeats it.
        state.install_snapshot(&snap).unwrap();
        assert_eq!(metrics.grants_rejected.get(), 2);
        // A good grant beside it still applies, to its path only.
        snap.grants.push(wire("g-good", &["/ok"]));
        state.install_snapshot(&snap).unwrap();
        assert!(get(&state, "/ok") && !get(&state, "/admin"));
        assert!(!state.decide_l4(web, orders, Some(8080), None).permits());
    }

    fn http_verdict(state: &PolicyState, source: &str, method: &str, path: &str) -> Verdict {
        state.decide_http(
            source,
            crate::conn::testing::ME,
            Some(8080),
            None,
            &HttpFacts {
                method,
                path,
                headers: &[("x-trace", "1")],
            },
        )
    }

    #[test]
    fn l4_and_http_decisions_agree_on_the_same_caller_and_only_http_sees_the_path() {
        use crate::conn::testing::{BATCH, ME, WEB};
        let state = crate::conn::testing::policy(Arc::new(Metrics::new()));
        for (source, allowed) in [(WEB, true), (BATCH, false)] {
            let l4 = state.decide_l4(source, ME, Some(8080), None);
            let http = http_verdict(&state, source, "GET", "/orders/1");
            assert_eq!(l4.permits(), allowed, "{source} at L4");
            assert_eq!(http.permits(), allowed, "{source} over HTTP");
            assert_eq!(l4.by(), http.by(), "{source}: decided by another rule");
            assert_eq!(state.may_allow_any(source, ME, Some(8080), None), allowed);
            assert_ne!(l4.decision_id(), http.decision_id());
        }
        // The HTTP facts reach the engine: a path rule denies what the connection allows.
        let admin = http_verdict(&state, WEB, "GET", "/admin/users");
        assert!(!admin.permits());
        let mut fields = serde_json::Map::new();
        admin.audit_into(&mut fields);
        assert_eq!(fields["rule"], "no-admin");
    }

    #[test]
    fn without_a_policy_every_decision_is_a_default_deny() {
        use crate::conn::testing::{ME, WEB};
        let state = PolicyState::new(None, Arc::new(Metrics::new()));
        assert!(matches!(
            state.decide_l4(WEB, ME, Some(8080), None),
            Verdict::NoPolicy
        ));
        assert!(matches!(
            http_verdict(&state, WEB, "GET", "/orders/1"),
            Verdict::NoPolicy
        ));
        assert!(!state.may_allow_any(WEB, ME, Some(8080), None));
    }
}
