//! The `[workload_api]` section: where the SPIFFE Workload API socket lives, its file mode, and
//! which OS users and groups may call it. Off unless the section is present.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Ctx};

/// The socket's mode when none is configured: owner and group may connect.
pub(super) const DEFAULT_MODE: u32 = 0o660;

/// The Workload API settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadApiConfig {
    /// The unix socket the API is served on (a stale socket file there is replaced).
    pub socket: PathBuf,
    /// The socket file's permission bits (0o660 by default).
    pub mode: u32,
    /// Callers whose uid is listed may call.
    pub allowed_uids: Vec<u32>,
    /// Callers whose primary gid is listed may call.
    pub allowed_gids: Vec<u32>,
}

impl WorkloadApiConfig {
    /// Whether a caller with these credentials may call.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.allowed_uids.contains(&uid) || self.allowed_gids.contains(&gid)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkloadApi {
    socket: PathBuf,
    mode: Option<toml::Value>,
    #[serde(default)]
    allowed_uids: Vec<u32>,
    #[serde(default)]
    allowed_gids: Vec<u32>,
}

impl RawWorkloadApi {
    pub(super) fn check(
        self,
        c: &Ctx<'_>,
        rel: impl Fn(PathBuf) -> PathBuf,
    ) -> Result<WorkloadApiConfig, ConfigError> {
        if self.socket.as_os_str().is_empty() {
            return Err(c.bad("workload_api.socket", "must be a path"));
        }
        let mode = match self.mode {
            None => DEFAULT_MODE,
            Some(v) => parse_mode(&v).map_err(|e| c.bad("workload_api.mode", e))?,
        };
        if self.allowed_uids.is_empty() && self.allowed_gids.is_empty() {
            return Err(c.bad(
                "workload_api.allowed_uids",
                "set allowed_uids, allowed_gids or both: nobody else may call the Workload API",
            ));
        }
        Ok(WorkloadApiConfig {
            socket: rel(self.socket),
            mode,
            allowed_uids: self.allowed_uids,
            allowed_gids: self.allowed_gids,
        })
    }
}

/// `"0660"` (octal digits in a string) or a TOML octal integer (`0o660`), at most `0o777`.
fn parse_mode(v: &toml::Value) -> Result<u32, String> {
    let n = match v {
        toml::Value::String(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .map_err(|_| format!("{s:?} is not an octal mode such as \"0660\""))?,
        toml::Value::Integer(i) => u32::try_from(*i).map_err(|_| format!("{i} is not a mode"))?,
        other => return Err(format!("{other} is not a mode: write it as \"0660\"")),
    };
    if n > 0o777 {
        return Err(format!(
            "{n} is more than 0o777: write the mode in octal, as \"0660\" or 0o660"
        ));
    }
    Ok(n)
}
