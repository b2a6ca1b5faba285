//! The `[audit]` section: where the spool lives and how large it may grow, what happens when
//! it is full, whether a decision waits for its record to be on disk, and where copies go.
//! The audit trail takes these settings; nothing here depends on the audit module.

use std::path::{Path, PathBuf};

use mayfly_ca::id::SpiffeId;
use serde::Deserialize;

use super::{ConfigError, Ctx};

/// What to do when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Refuse new connections and requests until the spool drains.
    FailClosed,
    /// Drop records, count them, and write a `gap` record when space returns.
    Drop,
}

impl WhenFull {
    /// The name written in the config (`fail-closed`, `drop`).
    pub fn as_str(self) -> &'static str {
        match self {
            WhenFull::FailClosed => "fail-closed",
            WhenFull::Drop => "drop",
        }
    }
}

/// When a decision's record must be on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Synced at least every `SYNC_EVERY` (200 ms) off the data path: a crash loses up to that
    /// window of records of traffic that already happened (the loss itself is recorded as a
    /// `gap`).
    #[default]
    Batched,
    /// A request is forwarded (a connection spliced, a denial answered) only once its decision
    /// record is written and synced; a record that cannot be made durable refuses the traffic.
    Strict,
}

/// A copy of every record for people who ship logs with their own tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// None.
    None,
    /// JSON lines on standard output.
    Stdout,
    /// JSON lines appended to a file.
    File(PathBuf),
}

/// Audit settings.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Spool directory (0700).
    pub spool_dir: PathBuf,
    /// Spool size limit in bytes.
    pub max_spool_bytes: u64,
    /// Behaviour when full.
    pub when_full: WhenFull,
    /// Extra JSON-lines sink.
    pub sink: Sink,
    /// Stream records to the control plane.
    pub ship: bool,
    /// When a decision's record must be on disk.
    pub durability: Durability,
}

impl AuditConfig {
    /// Creates the spool directory (0700) if need be and checks a file can be written in it,
    /// so that `check` (and `run`, before binding any port) refuses an install whose spool has
    /// no writable home instead of failing at start. `name` names the configuration.
    pub fn check_spool_dir(&self, name: &str) -> Result<(), ConfigError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = &self.spool_dir;
        let bad = |what: &str, e: std::io::Error| ConfigError::Invalid {
            path: name.to_owned(),
            key: "audit.spool_dir".into(),
            reason: format!(
                "cannot {what} {}: {e} (set [audit] spool_dir to a writable directory; under systemd, StateDirectory= gives one)",
                dir.display()
            ),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| bad("create", e))?;
        let probe = dir.join(format!(".check-{}.tmp", std::process::id()));
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&probe)
            .map_err(|e| bad("write in", e))?;
        std::fs::remove_file(&probe).map_err(|e| bad("write in", e))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    spool_dir: Option<PathBuf>,
    max_spool_bytes: Option<u64>,
    when_full: Option<WhenFull>,
    sink: Option<String>,
    ship: Option<bool>,
    durability: Option<Durability>,
}

impl RawAudit {
    /// The checked settings; relative paths go through `rel`. Without `spool_dir`, the spool
    /// is `mayfly-audit/<ID path>` in `state_dir` (systemd's `$STATE_DIRECTORY`) when given,
    /// else beside the config.
    pub(super) fn check(
        self,
        c: &Ctx<'_>,
        spiffe_id: &SpiffeId,
        state_dir: Option<&Path>,
        rel: impl Fn(PathBuf) -> PathBuf,
    ) -> Result<AuditConfig, ConfigError> {
        Ok(AuditConfig {
            // One spool per identity by default: two sidecars must never share one.
            spool_dir: rel(self.spool_dir.unwrap_or_else(|| {
                state_dir
                    .unwrap_or(Path::new(""))
                    .join("mayfly-audit")
                    .join(spiffe_id.path().trim_start_matches('/').replace('/', "_"))
            })),
            max_spool_bytes: match self.max_spool_bytes.unwrap_or(64 << 20) {
                n if n < 4096 => {
                    return Err(c.bad("audit.max_spool_bytes", "must be at least 4096"));
                }
                n => n,
            },
            when_full: self.when_full.unwrap_or(WhenFull::FailClosed),
            sink: match self.sink.as_deref() {
                None | Some("none") => Sink::None,
                Some("stdout") => Sink::Stdout,
                Some(s) => match s.strip_prefix("file:") {
                    Some(p) if !p.is_empty() => Sink::File(rel(PathBuf::from(p))),
                    _ => {
                        return Err(c.bad(
                            "audit.sink",
                            format!("{s:?}: use \"none\", \"stdout\" or \"file:/path\""),
                        ));
                    }
                },
            },
            ship: self.ship.unwrap_or(true),
            durability: self.durability.unwrap_or_default(),
        })
    }
}
