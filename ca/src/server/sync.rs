//! Several replicas on one store: how each learns of the others' changes, and the policy
//! they all serve.
//!
//! Every write of shared state (grants, endpoint registrations, published policies, the
//! authority set) bumps a change counter in the store in its own transaction. Each replica
//! reads the counters every [`POLL`] (one small query) and, for each that moved, takes the
//! store's state: the grants are read again for the watch streams, the endpoint registry is
//! reloaded, the newest published policy is put in force, the authority set (another
//! replica rotated) is loaded and its bundle served. So a change made on one replica reaches
//! the watch streams of every replica within [`POLL`] plus one read (well under a second).
//! Polling, not LISTEN/NOTIFY: it works the same on SQLite, needs no connection held per
//! replica, and a notification lost while a connection was down cannot be missed (the
//! counters are state, not events).
//!
//! While the store cannot be read, a replica keeps serving what it has (bundle, policy,
//! grants, endpoints) and catches up on the first successful read.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::ca::Ca;
use super::policy::{LoadedPolicy, load, parse};
use crate::server::store::{Changes, StoreError};

/// How often a replica reads the store's change counters.
pub const POLL: Duration = Duration::from_millis(500);

/// Who publishes from this process, as the store records it.
fn publisher(file: &Path) -> String {
    format!("pid {} from {}", std::process::id(), file.display())
}

/// Publishes `p` (read from `file`) to the store; false when the store refused it (retry).
pub(super) async fn publish(ca: &Arc<Ca>, file: &Path, p: Arc<LoadedPolicy>) -> bool {
    let (ca2, by, file_text) = (ca.clone(), publisher(file), file.display().to_string());
    let r = tokio::task::spawn_blocking(move || {
        publish_now(&ca2, &p, &by, &file_text).map(|new| (new, p.version.clone()))
    })
    .await;
    match r {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            warn!(error = %e, "cannot publish the policy to the store; this replica serves it meanwhile and retries every second");
            false
        }
        Err(e) => {
            error!(error = %e, "the policy publication task failed");
            false
        }
    }
}

fn publish_now(ca: &Ca, p: &LoadedPolicy, by: &str, file: &str) -> Result<bool, StoreError> {
    let new = ca
        .store()
        .publish_policy(&p.version, &p.source, OffsetDateTime::now_utc(), by)?;
    if new {
        info!(version = %p.version, file, "policy published: every replica serves it (the last published wins)");
        ca.event(
            "policy.published",
            json!({ "version": p.version, "file": file, "by": by }),
        );
    }
    Ok(new)
}

/// At start: a replica with a policy file publishes it (it becomes the policy of every
/// replica); one without serves the newest published policy, if any.
pub fn start(ca: &Ca) -> Result<(), StoreError> {
    match ca.dist.file() {
        Some(file) => {
            let Some(p) = ca.dist.policy.load_full() else {
                return Ok(());
            };
            publish_now(ca, &p, &publisher(file), &file.display().to_string()).map(|_| ())
        }
        None => adopt_published(ca),
    }
}

/// Puts the store's newest policy in force if it is not already. A replica whose own file
/// says otherwise logs and records that it is superseded: the last published wins.
fn adopt_published(ca: &Ca) -> Result<(), StoreError> {
    let Some(p) = ca.store().policy()? else {
        return Ok(());
    };
    if Some(&p.version) == ca.dist.version().as_ref() {
        return Ok(());
    }
    let loaded = match parse(p.source, "the published policy") {
        Ok(l) => l,
        Err(e) => {
            error!(version = %p.version, by = %p.published_by, "the newest published policy does not load here; the policy in force stays:\n{e}");
            return Ok(());
        }
    };
    info!(version = %p.version, by = %p.published_by, "a newly published policy is in force; pushing it to every sidecar");
    if let Some(file) = ca.dist.file() {
        let mine = load(file).map(|l| l.version).ok();
        if mine.as_deref() != Some(p.version.as_str()) {
            warn!(
                file = %file.display(),
                file_version = mine.as_deref().unwrap_or("invalid"),
                published = %p.version,
                by = %p.published_by,
                "another replica published a different policy, which supersedes this replica's --policy file (the last published wins)"
            );
            ca.event(
                "policy.superseded",
                json!({ "version": p.version, "by": p.published_by,
                        "file": file.display().to_string(), "file_version": mine }),
            );
        }
    }
    ca.dist.set(loaded);
    Ok(())
}

/// Takes what moved between `seen` and `now`; returns the counters now reflected (a topic
/// whose update failed keeps its old counter, so it is tried again at the next poll).
fn apply(ca: &Ca, seen: Changes, now: Changes) -> Changes {
    let mut done = seen;
    let report = |what: &str, e: &dyn std::fmt::Display| {
        warn!(error = %e, "cannot take {what} changed by another replica; retrying");
    };
    if now.grants != seen.grants {
        ca.dist.bump();
        done.grants = now.grants;
    }
    if now.endpoints != seen.endpoints {
        match ca.registry.reload(OffsetDateTime::now_utc()) {
            Ok(()) => done.endpoints = now.endpoints,
            Err(e) => report("the endpoints", &e),
        }
    }
    if now.policy != seen.policy {
        match adopt_published(ca) {
            Ok(()) => done.policy = now.policy,
            Err(e) => report("the policy", &e),
        }
    }
    if now.authorities != seen.authorities {
        if now.authorities == ca.authorities_seen() {
            done.authorities = now.authorities;
        } else {
            match ca.reload_authorities() {
                Ok(changed) => {
                    info!(
                        bundle_changed = changed,
                        "took the CA authorities another replica rotated"
                    );
                    done.authorities = now.authorities;
                }
                Err(e) => report("the CA authorities", &e),
            }
        }
    }
    done
}

/// Follows the store's change counters every [`POLL`] until `stop`, from `baseline` (read
/// before the replica loaded the state it started with).
pub async fn follow(ca: Arc<Ca>, baseline: Changes, mut stop: watch::Receiver<bool>) {
    let mut seen = baseline;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
        let ca2 = ca.clone();
        let read = tokio::task::spawn_blocking(move || {
            let now = ca2.store().changes()?;
            Ok::<_, StoreError>(if seen == now {
                now
            } else {
                apply(&ca2, seen, now)
            })
        })
        .await;
        match read {
            Ok(Ok(now)) => {
                if failing {
                    info!("the store answers again; following other replicas' changes");
                    failing = false;
                }
                seen = now;
            }
            Ok(Err(e)) => {
                if !failing {
                    warn!(error = %e, "cannot read the store's change counters; serving what this replica has until it can");
                    failing = true;
                }
            }
            Err(e) => error!(error = %e, "the change follower task failed"),
        }
    }
}
