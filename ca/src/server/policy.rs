//! Central policy: the control plane holds the policy file (validated, versioned, reloaded on
//! change; a bad file is refused and the last good one stays) and the change generation every
//! sidecar's `GET /v1/watch` waits on.
//!
//! Below [`super::ca`], which holds the [`Distribution`]: what needs the control plane itself
//! (building snapshots, reloading the file, the grants) is in [`super::distribution`], which
//! re-exports these types.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use mayfly_policy::{GrantSettings, Policy};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::identity::api::GrantWire;

/// A loaded policy.
pub struct LoadedPolicy {
    /// Content hash.
    pub version: String,
    /// TOML source, as pushed to sidecars.
    pub source: String,
    /// Its `[grants]` limits.
    pub settings: GrantSettings,
    /// Its `[[access.rule]]`s: what people may ask for.
    pub access: Vec<mayfly_policy::AccessRule>,
}

/// The policy and grants the control plane distributes.
pub struct Distribution {
    /// The policy file, if any.
    pub(super) file: Option<PathBuf>,
    /// The policy in force.
    pub(super) policy: ArcSwapOption<LoadedPolicy>,
    /// The change generation every watcher waits on.
    pub(super) changes: watch::Sender<u64>,
    /// The grants in force as last read (see [`super::distribution`]).
    pub(super) live: tokio::sync::Mutex<LiveCache>,
}

/// The grants in force as last read from the store, shared by every watcher.
#[derive(Default)]
pub(super) struct LiveCache {
    /// The last good read and the change generation it reflects.
    pub(super) good: Option<(u64, Arc<Vec<GrantWire>>)>,
    /// The generation and time of the last failed read (retried at most once a second).
    pub(super) failed: Option<(u64, Instant)>,
}

/// How soon a failed read of the grants is tried again for the same generation.
pub(super) const RETRY_FAILED_READ: Duration = Duration::from_secs(1);

/// Why a policy file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyFileError {
    /// The file cannot be read.
    #[error("cannot read policy file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid policy (its diagnostics, said in full).
    #[error("{0}")]
    Invalid(mayfly_policy::PolicyError),
}

/// Reads and validates the policy file.
pub(super) fn load(file: &PathBuf) -> Result<LoadedPolicy, PolicyFileError> {
    let src = std::fs::read_to_string(file).map_err(|source| PolicyFileError::Read {
        path: file.clone(),
        source,
    })?;
    parse(src, &file.display().to_string())
}

/// Validates a policy's source; `origin` names it in diagnostics.
pub(super) fn parse(src: String, origin: &str) -> Result<LoadedPolicy, PolicyFileError> {
    let loaded = Policy::from_toml_at(&src, origin, OffsetDateTime::now_utc())
        .map_err(PolicyFileError::Invalid)?;
    Ok(LoadedPolicy {
        version: loaded.policy.version().to_owned(),
        settings: *loaded.policy.grants(),
        access: loaded.policy.access().to_vec(),
        source: src,
    })
}

impl Distribution {
    /// Loads the policy file, if any. An invalid file is an error at start-up.
    pub fn new(file: Option<PathBuf>) -> Result<Arc<Self>, PolicyFileError> {
        let policy = match &file {
            Some(f) => Some(Arc::new(load(f)?)),
            None => None,
        };
        let (changes, _) = watch::channel(0);
        Ok(Arc::new(Self {
            file,
            policy: ArcSwapOption::new(policy),
            changes,
            live: tokio::sync::Mutex::new(LiveCache::default()),
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

    /// The policy's access rules (none without a policy: people get nothing).
    pub fn access_rules(&self) -> Vec<mayfly_policy::AccessRule> {
        self.policy
            .load()
            .as_ref()
            .map(|p| p.access.clone())
            .unwrap_or_default()
    }

    /// Puts `p` in force and tells every watcher.
    pub(super) fn set(&self, p: LoadedPolicy) {
        self.policy.store(Some(Arc::new(p)));
        self.bump();
    }

    /// The policy file this replica publishes, if any.
    pub fn file(&self) -> Option<&PathBuf> {
        self.file.as_ref()
    }

    /// The version in force.
    pub fn version(&self) -> Option<String> {
        self.policy.load().as_ref().map(|p| p.version.clone())
    }
}
