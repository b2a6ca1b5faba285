//! The sidecar's configuration file (`sidecar.toml`), parsed and checked completely before any
//! port is bound. Every error names the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mayfly_ca::duration::parse_duration;
use mayfly_ca::id::{SpiffeId, parse_workload_id};
use serde::Deserialize;

mod audit;
mod inbound;
mod raw;
mod workload_api;

pub use audit::{AuditConfig, Durability, Sink, WhenFull};
use raw::{Raw, RawAddresses};
pub use workload_api::WorkloadApiConfig;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The environment variable meant to hold the configuration is unset or not UTF-8.
    #[error("${var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// Why.
        reason: String,
    },
    /// TOML syntax, an unknown key or a wrong type (the message carries line and column).
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// toml's message with the position.
        message: String,
    },
    /// A value is invalid.
    #[error("{path}: `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// The key, dotted (`outbound[1].spiffe_id`).
        key: String,
        /// Why.
        reason: String,
    },
}

/// L4 or HTTP-aware proxying of a listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Bytes are spliced; one policy decision per connection.
    #[default]
    Tcp,
    /// HTTP/1.1 and HTTP/2; one policy decision per request.
    Http,
}

/// How the inbound sidecar speaks HTTP to the local app.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 (pooled keep-alive connections).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c): gRPC servers need this.
    Http2,
}

/// What HTTP mode does with a request header that spells a header the sidecar controls
/// (`x-forwarded-client-cert`, `x-mayfly-decision-id`) with `_` for `-`: WSGI and CGI-style
/// servers fold both spellings into one variable, so a forged one would reach the app beside
/// the sidecar's own (Envoy's `headers_with_underscores_action`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnderscoreHeaders {
    /// Remove the header and pass the request on.
    #[default]
    Drop,
    /// Answer 400 (gRPC: INVALID_ARGUMENT).
    Reject,
}

/// Where the join token comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A file, read (again) whenever a bootstrap is needed.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A Kubernetes projected service-account token (audience `mayfly`), read fresh for every
    /// bootstrap: the pod attests instead of presenting a join token. Needs `ca_pin`.
    K8s(PathBuf),
}

/// The control plane.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// `host:port`, or the replicas' addresses separated by commas (see
    /// [`ControlPlane::addresses`]).
    pub address: String,
    /// The join token.
    pub token: TokenSource,
    /// With [`TokenSource::K8s`]: the pin of the control plane's root (hex SHA-256 of its
    /// SubjectPublicKeyInfo; a join token carries its own).
    pub ca_pin: Option<String>,
    /// SVID TTL asked for (the control plane caps it).
    pub svid_ttl: Option<Duration>,
}

/// The inbound listener.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Where peers connect (mTLS).
    pub listen: SocketAddr,
    /// The local app.
    pub app: SocketAddr,
    /// TCP or HTTP.
    pub protocol: Protocol,
    /// HTTP version towards the app (`protocol = "http"` only).
    pub app_protocol: AppProtocol,
    /// The address peers dial (`HOST:PORT`, where `${NAME}` stands for the environment
    /// variable `NAME`, read at start), registered with the control plane; `None`: the listen
    /// address (never a wildcard: a wildcard listener must say what to advertise).
    pub advertise: Option<String>,
}

/// One outbound upstream.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// A name for logs and metrics.
    pub name: String,
    /// Where the local app connects in plaintext (loopback).
    pub listen: SocketAddr,
    /// The static remote as configured (its addresses joined by `,`), for logs and the admin
    /// view; `None`: the live endpoints registered under `spiffe_id` (see `upstreams`).
    pub remote: Option<String>,
    /// The static remote sidecars' inbound `HOST:PORT`s (an IP, or a DNS name re-resolved
    /// periodically); empty: by identity.
    pub remotes: Vec<String>,
    /// The SPIFFE ID the remote must present.
    pub spiffe_id: SpiffeId,
    /// TCP or HTTP.
    pub protocol: Protocol,
    /// The destination service port as the policy sees it (for egress rules with `ports`).
    pub port: Option<u16>,
    /// HTTP mode: how long a request may wait for its answer's head, retries included
    /// (answered 504 past it).
    pub request_timeout: Duration,
}

/// An HTTP request's deadline when `request_timeout` is not set.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Timeouts and limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// TCP connect to the app or a remote sidecar.
    pub connect_timeout: Duration,
    /// TLS handshake.
    pub handshake_timeout: Duration,
    /// No byte in either direction for this long closes a connection.
    pub idle_timeout: Duration,
    /// How long SIGTERM waits for in-flight connections.
    pub drain_timeout: Duration,
    /// Connections beyond this are refused.
    pub max_connections: usize,
    /// HTTP mode: request headers spelling an identity header with `_`.
    pub underscore_identity_headers: UnderscoreHeaders,
}

/// The whole, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This sidecar's identity.
    pub spiffe_id: SpiffeId,
    /// The control plane.
    pub control_plane: ControlPlane,
    /// Inbound listeners (`[inbound]` or `[[inbound]]`), one per app port; may be empty.
    pub inbound: Vec<Inbound>,
    /// Outbound upstreams.
    pub outbound: Vec<Outbound>,
    /// Local policy file (standalone mode).
    pub policy_file: Option<PathBuf>,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Limits.
    pub limits: Limits,
    /// Tokio worker threads (1 = a current-thread runtime).
    pub worker_threads: usize,
    /// The audit trail.
    pub audit: AuditConfig,
    /// The SPIFFE Workload API for the local app (`[workload_api]`); `None`: off.
    pub workload_api: Option<WorkloadApiConfig>,
}

/// The variable systemd sets to the unit's `StateDirectory=` (several are joined with `:`;
/// the first is used): the sidecar's default spool directory lives there when it is set.
pub const STATE_DIRECTORY_ENV: &str = "STATE_DIRECTORY";

/// The first directory of `$STATE_DIRECTORY`, if set and not empty; it must be absolute.
fn state_directory() -> Result<Option<PathBuf>, ConfigError> {
    let Some(v) = std::env::var_os(STATE_DIRECTORY_ENV) else {
        return Ok(None);
    };
    match std::env::split_paths(&v).next() {
        Some(p) if p.as_os_str().is_empty() => Ok(None),
        Some(p) if p.is_absolute() => Ok(Some(p)),
        Some(p) => Err(ConfigError::Env {
            var: STATE_DIRECTORY_ENV.into(),
            reason: format!("{} is not an absolute path", p.display()),
        }),
        None => Ok(None),
    }
}

/// Whether `a` is `HOST:PORT` (a name, an IPv4 address or `[IPv6]`, and a port from 1), the
/// reason if not.
fn check_host_port(a: &str) -> Result<(), &'static str> {
    let Some((host, port)) = a.rsplit_once(':') else {
        return Err("is not HOST:PORT");
    };
    if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
        return Err("has no valid port (HOST:PORT, port 1-65535)");
    }
    let host = match host.strip_prefix('[') {
        Some(v6) => match v6.strip_suffix(']') {
            Some(ip) if ip.parse::<std::net::Ipv6Addr>().is_ok() => return Ok(()),
            _ => return Err("has a bad IPv6 address (write [ADDR]:PORT)"),
        },
        None => host,
    };
    let name_char = |ch: char| ch.is_ascii_alphanumeric() || ch == '-' || ch == '.' || ch == '_';
    if host.is_empty() || !host.chars().all(name_char) {
        return Err("has no valid host (a DNS name or an IP address, then :PORT)");
    }
    Ok(())
}

impl ControlPlane {
    /// The control plane's addresses: one, or one per replica (a name may resolve to several).
    pub fn addresses(&self) -> Vec<String> {
        self.address.split(',').map(str::to_owned).collect()
    }
}

struct Ctx<'a> {
    path: &'a str,
}

impl Ctx<'_> {
    fn bad(&self, key: impl Into<String>, reason: impl std::fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.into(),
            reason: reason.to_string(),
        }
    }

    fn addr(&self, key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
        v.parse()
            .map_err(|_| self.bad(key, format!("{v:?} is not an IP:port address")))
    }

    /// `control_plane.address`: one `HOST:PORT` or a non-empty list of them.
    fn control_plane_addresses(&self, raw: RawAddresses) -> Result<Vec<String>, ConfigError> {
        const KEY: &str = "control_plane.address";
        let (list, listed) = match raw {
            RawAddresses::One(a) => (vec![a], false),
            RawAddresses::Many(l) => (l, true),
        };
        if list.is_empty() {
            return Err(self.bad(KEY, "the list is empty: give at least one HOST:PORT"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, a) in list.iter().enumerate() {
            let key = if listed {
                format!("{KEY}[{i}]")
            } else {
                KEY.to_owned()
            };
            if let Err(why) = check_host_port(a) {
                return Err(self.bad(key, format!("{a:?} {why}")));
            }
            if !seen.insert(a.as_str()) {
                return Err(self.bad(key, format!("{a:?} is listed twice")));
            }
        }
        Ok(list)
    }

    fn dur(&self, key: &str, v: Option<&str>, dflt: Duration) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(dflt),
            Some(s) => match parse_duration(s) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(self.bad(key, "must be greater than zero")),
                Err(e) => Err(self.bad(key, e)),
            },
        }
    }

    fn id(&self, key: &str, v: &str) -> Result<SpiffeId, ConfigError> {
        parse_workload_id(v).map_err(|e| self.bad(key, e))
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let state_dir = state_directory()?;
        Self::parse_in(
            &text,
            &path.display().to_string(),
            base,
            state_dir.as_deref(),
        )
    }

    /// Reads and checks a configuration held whole in the environment variable `var` (how
    /// `mayfly-sidecar inject` configures a pod: `MAYFLY_SIDECAR_CONFIG_TOML`). Relative paths
    /// are taken from the working directory.
    pub fn load_env(var: &str) -> Result<Self, ConfigError> {
        let text = std::env::var(var).map_err(|e| ConfigError::Env {
            var: var.to_owned(),
            reason: match e {
                std::env::VarError::NotPresent => "not set".into(),
                std::env::VarError::NotUnicode(_) => "not UTF-8".into(),
            },
        })?;
        let state_dir = state_directory()?;
        Self::parse_in(
            &text,
            &format!("${var}"),
            Path::new("."),
            state_dir.as_deref(),
        )
    }

    /// Parses config text; relative paths are taken from `base` (and so is the default spool
    /// directory: see [`Config::parse_in`]).
    pub fn parse(text: &str, name: &str, base: &Path) -> Result<Self, ConfigError> {
        Self::parse_in(text, name, base, None)
    }

    /// Parses config text; relative paths are taken from `base`. The default audit spool
    /// directory is `mayfly-audit/<ID path>` in `state_dir` when given (the service manager's
    /// writable directory for this sidecar: [`STATE_DIRECTORY_ENV`]), else beside the config;
    /// an explicit `[audit] spool_dir` always wins.
    pub fn parse_in(
        text: &str,
        name: &str,
        base: &Path,
        state_dir: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: name.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let c = Ctx { path: name };
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let spiffe_id = c.id("spiffe_id", &raw.spiffe_id)?;
        let cp = raw.control_plane;
        let token = match (cp.token_file, cp.token_env, cp.k8s_token_file) {
            (Some(f), None, None) => TokenSource::File(rel(f)),
            (None, Some(e), None) if !e.is_empty() => TokenSource::Env(e),
            (None, None, Some(f)) => TokenSource::K8s(rel(f)),
            (None, None, None) => {
                return Err(c.bad(
                    "control_plane.token_file",
                    "set token_file or token_env (the join token from `mayfly-ca token create`), or k8s_token_file",
                ));
            }
            _ => {
                return Err(c.bad(
                    "control_plane.token_env",
                    "set exactly one of token_file, token_env and k8s_token_file",
                ));
            }
        };
        let ca_pin = match (&token, cp.ca_pin) {
            (TokenSource::K8s(_), Some(pin))
                if pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Some(pin.to_ascii_lowercase())
            }
            (TokenSource::K8s(_), Some(_)) => {
                return Err(c.bad(
                    "control_plane.ca_pin",
                    "must be 64 hex digits: `mayfly-ca bundle show --format pin`",
                ));
            }
            (TokenSource::K8s(_), None) => {
                return Err(c.bad(
                    "control_plane.ca_pin",
                    "required with k8s_token_file: `mayfly-ca bundle show --format pin`",
                ));
            }
            (_, Some(_)) => {
                return Err(c.bad(
                    "control_plane.ca_pin",
                    "only used with k8s_token_file (a join token carries its own pin)",
                ));
            }
            (_, None) => None,
        };
        let raw_address = c.control_plane_addresses(cp.address)?.join(",");
        let raw_svid_ttl = cp.svid_ttl;
        let svid_ttl = match raw_svid_ttl.as_deref() {
            None => None,
            Some(s) => {
                let d = c.dur("control_plane.svid_ttl", Some(s), Duration::ZERO)?;
                if d > Duration::from_secs(3600) {
                    return Err(c.bad("control_plane.svid_ttl", "at most 60m"));
                }
                Some(d)
            }
        };
        let inbound = c.inbound(raw.inbound)?;
        let mut outbound = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (n, o) in raw.outbound.into_iter().enumerate() {
            let key = |k: &str| format!("outbound[{n}].{k}");
            if o.name.is_empty() || !names.insert(o.name.clone()) {
                return Err(c.bad(key("name"), "must be non-empty and unique"));
            }
            let listen = c.addr(&key("listen"), &o.listen)?;
            if !listen.ip().is_loopback() {
                return Err(c.bad(
                    key("listen"),
                    "must be a loopback address: the app speaks plaintext to it",
                ));
            }
            let given = o.remote.is_some();
            let remotes = match o.remote {
                None => Vec::new(),
                Some(raw::RawRemote::One(r)) => vec![r],
                Some(raw::RawRemote::Many(l)) => l,
            };
            let bad_remote = |r: &String| {
                r.trim() != r
                    || r.rsplit_once(':').is_none_or(|(h, p)| {
                        h.is_empty() || h.contains('/') || p.parse::<u16>().is_err()
                    })
            };
            if (remotes.is_empty() && given) || remotes.iter().any(bad_remote) {
                return Err(c.bad(
                    key("remote"),
                    "must be HOST:PORT (an IP or a DNS name) or a list of them, or left out to use the endpoints registered under `spiffe_id`",
                ));
            }
            outbound.push(Outbound {
                spiffe_id: c.id(&key("spiffe_id"), &o.spiffe_id)?,
                name: o.name,
                listen,
                remote: (!remotes.is_empty()).then(|| remotes.join(",")),
                remotes,
                protocol: o.protocol,
                port: o.port,
                request_timeout: c.dur(
                    &key("request_timeout"),
                    o.request_timeout.as_deref(),
                    DEFAULT_REQUEST_TIMEOUT,
                )?,
            });
        }
        if inbound.is_empty() && outbound.is_empty() {
            return Err(c.bad(
                "inbound",
                "configure an [inbound] listener, an [[outbound]] upstream, or both",
            ));
        }
        let limits = Limits {
            connect_timeout: c.dur(
                "limits.connect_timeout",
                raw.limits.connect_timeout.as_deref(),
                Duration::from_secs(5),
            )?,
            handshake_timeout: c.dur(
                "limits.handshake_timeout",
                raw.limits.handshake_timeout.as_deref(),
                Duration::from_secs(10),
            )?,
            idle_timeout: c.dur(
                "limits.idle_timeout",
                raw.limits.idle_timeout.as_deref(),
                Duration::from_secs(300),
            )?,
            drain_timeout: c.dur(
                "limits.drain_timeout",
                raw.limits.drain_timeout.as_deref(),
                Duration::from_secs(15),
            )?,
            max_connections: raw.limits.max_connections.unwrap_or(10_000),
            underscore_identity_headers: raw.limits.underscore_identity_headers.unwrap_or_default(),
        };
        if limits.max_connections == 0 {
            return Err(c.bad("limits.max_connections", "must be at least 1"));
        }
        let worker_threads = raw.runtime.worker_threads.unwrap_or(1);
        if !(1..=64).contains(&worker_threads) {
            return Err(c.bad("runtime.worker_threads", "must be between 1 and 64"));
        }
        let audit = raw.audit.check(&c, &spiffe_id, state_dir, rel)?;
        let workload_api = raw.workload_api.map(|w| w.check(&c, rel)).transpose()?;
        Ok(Config {
            workload_api,
            audit,
            spiffe_id,
            control_plane: ControlPlane {
                address: raw_address,
                token,
                ca_pin,
                svid_ttl,
            },
            inbound,
            outbound,
            policy_file: raw.policy.map(|p| rel(p.file)),
            admin: c.addr("admin.listen", &raw.admin.listen)?,
            limits,
            worker_threads,
        })
    }

    /// Checks that `[policy] file`, when set, is a readable file (its content is the policy
    /// engine's to check). Kept apart from [`Config::parse`], which touches no file.
    pub fn check_policy_file(&self, name: &str) -> Result<(), ConfigError> {
        let Some(path) = &self.policy_file else {
            return Ok(());
        };
        let bad = |reason: String| ConfigError::Invalid {
            path: name.to_owned(),
            key: "policy.file".into(),
            reason,
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => std::fs::File::open(path)
                .map(drop)
                .map_err(|e| bad(format!("cannot read {}: {e}", path.display()))),
            Ok(_) => Err(bad(format!("{} is not a file", path.display()))),
            Err(e) => Err(bad(format!("cannot read {}: {e}", path.display()))),
        }
    }
}

#[cfg(test)]
mod tests;
