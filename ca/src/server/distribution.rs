//! Central policy and just-in-time grants: the control plane holds the policy file (validated,
//! versioned, reloaded on change; a bad file is refused and the last good one stays) and the
//! grants, and pushes snapshots to every sidecar on `GET /v1/watch`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use mayfly_policy::{Grant, GrantSettings, PathPattern, Policy};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{error, info};

use super::ca::Ca;
use crate::api::{GrantWire, Snapshot};
use crate::duration::format_duration;

/// A loaded policy.
pub struct LoadedPolicy {
    /// Content hash.
    pub version: String,
    /// TOML source, as pushed to sidecars.
    pub source: String,
    /// Its `[grants]` limits.
    pub settings: GrantSettings,
}

/// The policy and grants the control plane distributes.
pub struct Distribution {
    file: Option<PathBuf>,
    policy: ArcSwapOption<LoadedPolicy>,
    changes: watch::Sender<u64>,
}

fn load(file: &PathBuf) -> Result<LoadedPolicy, String> {
    let src = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read policy file {}: {e}", file.display()))?;
    let loaded = Policy::from_toml_at(&src, &file.display().to_string(), OffsetDateTime::now_utc())
        .map_err(|e| e.to_string())?;
    Ok(LoadedPolicy {
        version: loaded.policy.version().to_owned(),
        settings: *loaded.policy.grants(),
        source: src,
    })
}

impl Distribution {
    /// Loads the policy file, if any. An invalid file is an error at start-up.
    pub fn new(file: Option<PathBuf>) -> Result<Arc<Self>, String> {
        let policy = match &file {
            Some(f) => Some(Arc::new(load(f)?)),
            None => None,
        };
        let (changes, _) = watch::channel(0);
        Ok(Arc::new(Self {
            file,
            policy: ArcSwapOption::new(policy),
            changes,
        }))
    }

    /// Tells every watcher something changed.
    pub fn bump(&self) {
        self.changes.send_modify(|g| *g += 1);
    }

    /// A receiver of change notifications.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The policy's grant limits (defaults without a policy).
    pub fn settings(&self) -> GrantSettings {
        self.policy
            .load()
            .as_ref()
            .map(|p| p.settings)
            .unwrap_or_default()
    }

    /// The version in force.
    pub fn version(&self) -> Option<String> {
        self.policy.load().as_ref().map(|p| p.version.clone())
    }

    /// The snapshot to push now.
    pub fn snapshot(&self, ca: &Ca) -> Snapshot {
        let p = self.policy.load();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let grants = list(ca)
            .unwrap_or_default()
            .into_iter()
            .filter(|g| g.state == "active" && g.expires.is_some_and(|e| e > now))
            .map(|g| GrantWire {
                id: g.id,
                from: g.from,
                to: g.to,
                methods: g.methods,
                paths: g.paths,
                not_before: g.not_before.unwrap_or(now),
                expires: g.expires.unwrap_or(now),
            })
            .collect();
        Snapshot {
            generation: *self.changes.borrow(),
            policy_version: p.as_ref().map(|p| p.version.clone()),
            policy: p.as_ref().map(|p| p.source.clone()),
            grants,
            bundle: serde_json::from_str(&ca.jwks()).unwrap_or(serde_json::Value::Null),
        }
    }

    /// Polls the policy file every second; reloads and pushes on change.
    pub async fn watch_file(self: Arc<Self>, ca: Arc<Ca>, mut stop: watch::Receiver<bool>) {
        let Some(file) = self.file.clone() else {
            return;
        };
        let mut last = std::fs::read(&file).ok();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
            let now = std::fs::read(&file).ok();
            if now == last {
                continue;
            }
            last = now;
            match load(&file) {
                Ok(p) if Some(&p.version) == self.version().as_ref() => {}
                Ok(p) => {
                    info!(version = %p.version, "policy reloaded; pushing it to every sidecar");
                    ca.event(
                        "policy.loaded",
                        json!({ "version": p.version, "file": file.display().to_string() }),
                    );
                    self.policy.store(Some(Arc::new(p)));
                    self.bump();
                }
                Err(e) => {
                    error!(
                        in_force = self.version().as_deref().unwrap_or("none"),
                        "policy file refused; the last good policy stays in force:\n{e}"
                    );
                    ca.event(
                        "policy.refused",
                        json!({ "error": e, "in_force": self.version() }),
                    );
                }
            }
        }
    }
}

/// A grant as the control plane keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantRecord {
    /// Id.
    pub id: String,
    /// Exact source.
    pub from: String,
    /// Exact destination.
    pub to: String,
    /// Methods (empty = any).
    pub methods: Vec<String>,
    /// Paths (empty = any).
    pub paths: Vec<String>,
    /// Why (required).
    pub reason: String,
    /// Lifetime once active.
    pub ttl_secs: i64,
    /// Requesting OS user.
    pub requested_by: String,
    /// Unix seconds.
    pub requested_at: i64,
    /// `pending`, `active`, `denied`, `revoked` (and `expired` in listings).
    pub state: String,
    /// Who approved, denied or revoked it.
    pub decided_by: Option<String>,
    /// Start of validity (set on activation).
    pub not_before: Option<i64>,
    /// End of validity (set on activation).
    pub expires: Option<i64>,
}

/// A grant request from the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantRequest {
    /// Exact source.
    pub from: String,
    /// Exact destination.
    pub to: String,
    /// Methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Paths.
    #[serde(default)]
    pub paths: Vec<String>,
    /// TTL such as `15m`.
    pub ttl: String,
    /// Reason.
    pub reason: String,
}

fn save(ca: &Ca, g: &GrantRecord) -> Result<(), String> {
    let body = serde_json::to_string(g).map_err(|e| e.to_string())?;
    ca.store()
        .put_grant(&g.id, &g.state, g.expires.unwrap_or(0), &body)
        .map_err(|e| e.to_string())
}

/// Every grant, with `expired` computed.
pub fn list(ca: &Ca) -> Result<Vec<GrantRecord>, String> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let mut out = Vec::new();
    for body in ca.store().list_grants().map_err(|e| e.to_string())? {
        let mut g: GrantRecord = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        if g.state == "active" && g.expires.is_some_and(|e| e <= now) {
            g.state = "expired".into();
        }
        out.push(g);
    }
    Ok(out)
}

fn get(ca: &Ca, id: &str) -> Result<GrantRecord, String> {
    list(ca)?
        .into_iter()
        .find(|g| g.id == id)
        .ok_or_else(|| format!("no grant with id {id}"))
}

fn activate(g: &mut GrantRecord) {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    g.state = "active".into();
    g.not_before = Some(now);
    g.expires = Some(now + g.ttl_secs);
}

/// `grant request`: checked against the policy's `[grants]` limits; active at once when the
/// policy needs no approval, pending otherwise.
pub fn request(
    ca: &Ca,
    dist: &Distribution,
    by: &str,
    req: GrantRequest,
) -> Result<GrantRecord, String> {
    if req.reason.trim().is_empty() {
        return Err("a reason is required (for example --reason \"INC-42\")".into());
    }
    let ttl = crate::duration::parse_duration(&req.ttl).map_err(|e| e.to_string())?;
    let settings = dist.settings();
    let now = OffsetDateTime::now_utc();
    let paths = req
        .paths
        .iter()
        .map(|p| PathPattern::parse(p).map_err(|e| format!("path {p:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let candidate = Grant {
        id: String::new(),
        from: req.from.clone(),
        to: req.to.clone(),
        methods: req.methods.clone(),
        paths,
        not_before: now,
        expires: now + time::Duration::seconds(ttl.as_secs() as i64),
    };
    candidate.check(&settings).map_err(|e| match e {
        mayfly_policy::GrantError::TooLong { .. } => format!(
            "TTL {} is over the policy's grants.max_ttl of {}",
            format_duration(ttl),
            format_duration(Duration::from_secs(
                settings.max_ttl.whole_seconds().max(0) as u64
            ))
        ),
        other => other.to_string(),
    })?;
    let mut id = [0u8; 4];
    crate::keys::fill_random(&mut id);
    let mut g = GrantRecord {
        id: format!("g-{}", hex::encode(id)),
        from: req.from,
        to: req.to,
        methods: req.methods,
        paths: req.paths,
        reason: req.reason,
        ttl_secs: ttl.as_secs() as i64,
        requested_by: by.to_owned(),
        requested_at: now.unix_timestamp(),
        state: "pending".into(),
        decided_by: None,
        not_before: None,
        expires: None,
    };
    if settings.approvals == 0 {
        activate(&mut g);
    }
    save(ca, &g)?;
    ca.event(
        "grant.requested",
        serde_json::to_value(&g).unwrap_or_default(),
    );
    if g.state == "active" {
        ca.event(
            "grant.activated",
            json!({ "grant": g.id, "expires": g.expires }),
        );
        dist.bump();
    }
    Ok(g)
}

/// `grant approve|deny|revoke`.
pub fn decide(
    ca: &Ca,
    dist: &Distribution,
    by: &str,
    id: &str,
    action: &str,
) -> Result<GrantRecord, String> {
    let mut g = get(ca, id)?;
    match (action, g.state.as_str()) {
        ("approve", "pending") => {
            if g.requested_by == by {
                ca.event(
                    "grant.self_approval_refused",
                    json!({ "grant": g.id, "user": by }),
                );
                return Err(format!(
                    "{by} requested grant {id} and cannot approve it: another admin must"
                ));
            }
            activate(&mut g);
        }
        ("deny", "pending") => g.state = "denied".into(),
        ("revoke", "active" | "pending") => g.state = "revoked".into(),
        (a, s) => return Err(format!("cannot {a} grant {id}: it is {s}")),
    }
    g.decided_by = Some(by.to_owned());
    save(ca, &g)?;
    ca.event(
        &format!(
            "grant.{}",
            match action {
                "approve" => "approved",
                "deny" => "denied",
                _ => "revoked",
            }
        ),
        json!({ "grant": g.id, "by": by, "from": g.from, "to": g.to, "expires": g.expires }),
    );
    dist.bump();
    Ok(g)
}

/// Wakes at each grant expiry so that watchers get a fresh snapshot and audit records the end.
pub async fn expiry_events(ca: Arc<Ca>, dist: Arc<Distribution>, mut stop: watch::Receiver<bool>) {
    let mut announced = std::collections::HashSet::new();
    loop {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let grants = list(&ca).unwrap_or_default();
        for g in grants.iter().filter(|g| g.state == "expired") {
            if announced.insert(g.id.clone()) {
                ca.event(
                    "grant.expired",
                    json!({ "grant": g.id, "from": g.from, "to": g.to }),
                );
                dist.bump();
            }
        }
        let next = grants
            .iter()
            .filter(|g| g.state == "active")
            .filter_map(|g| g.expires)
            .min()
            .map(|e| (e - now).clamp(0, 5))
            .unwrap_or(5);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(next as u64 * 1000 + 50)) => {}
            _ = stop.changed() => return,
        }
    }
}
