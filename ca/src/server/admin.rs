//! The admin socket: newline-delimited JSON over a unix socket in the data directory (0600),
//! each caller authorised by its OS user (SO_PEERCRED) against the configured admin list.
//!
//! Request: `{"op": "token.create", ...}`; answer: `{"ok": true, "data": ...}` or
//! `{"ok": false, "error": "..."}`. One request per line, one answer per line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::ca::Ca;
use crate::identity::duration::parse_duration;
use crate::server::store::TokenRecord;

/// The longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

/// An admin request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum AdminRequest {
    /// Create a join token.
    #[serde(rename = "token.create")]
    TokenCreate {
        /// The SPIFFE ID it may obtain.
        spiffe_id: String,
        /// TTL such as `10m`.
        ttl: String,
    },
    /// List join tokens.
    #[serde(rename = "token.list")]
    TokenList,
    /// Revoke a join token by id.
    #[serde(rename = "token.revoke")]
    TokenRevoke {
        /// The token's public id.
        id: String,
    },
    /// Authorities and their states.
    #[serde(rename = "status")]
    Status,
    /// Request a just-in-time grant.
    #[serde(rename = "grant.request")]
    GrantRequest(super::distribution::GrantRequest),
    /// Approve, deny or revoke a grant.
    #[serde(rename = "grant.decide")]
    GrantDecide {
        /// Grant id.
        id: String,
        /// `approve`, `deny` or `revoke`.
        action: String,
    },
    /// List grants.
    #[serde(rename = "grant.list")]
    GrantList,
    /// The live endpoints in the registry.
    #[serde(rename = "endpoints.list")]
    EndpointsList,
    /// The policy in force: the newest published (version, source, when, by whom).
    #[serde(rename = "policy.show")]
    PolicyShow,
    /// Audit records matching a filter, oldest first: the audit export.
    #[serde(rename = "audit.query")]
    AuditQuery(AuditQuery),
}

/// The filter of an `audit.query` (every field optional).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// From (Unix ms, inclusive).
    #[serde(default)]
    pub since_ms: Option<i64>,
    /// Until (Unix ms, exclusive).
    #[serde(default)]
    pub until_ms: Option<i64>,
    /// The calling side's SPIFFE ID.
    #[serde(default)]
    pub source: Option<String>,
    /// The called side's SPIFFE ID.
    #[serde(default)]
    pub destination: Option<String>,
    /// `allow` or `deny`.
    #[serde(default)]
    pub decision: Option<String>,
    /// Record kind.
    #[serde(default)]
    pub kind: Option<String>,
    /// Most records (default 100, at most [`MAX_AUDIT_EXPORT`]).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// The most records one `audit.query` returns (page with `since_ms`).
pub const MAX_AUDIT_EXPORT: u32 = 10_000;

/// An admin answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminResponse {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// The error, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AdminRequest {
    /// The operation's name, as in the request's `op`.
    pub fn op(&self) -> &'static str {
        match self {
            AdminRequest::TokenCreate { .. } => "token.create",
            AdminRequest::TokenList => "token.list",
            AdminRequest::TokenRevoke { .. } => "token.revoke",
            AdminRequest::Status => "status",
            AdminRequest::GrantRequest(_) => "grant.request",
            AdminRequest::GrantDecide { .. } => "grant.decide",
            AdminRequest::GrantList => "grant.list",
            AdminRequest::EndpointsList => "endpoints.list",
            AdminRequest::PolicyShow => "policy.show",
            AdminRequest::AuditQuery(_) => "audit.query",
        }
    }
}

fn ok(data: Value) -> AdminResponse {
    AdminResponse {
        ok: true,
        data: Some(data),
        error: None,
    }
}

fn err(msg: impl Into<String>) -> AdminResponse {
    AdminResponse {
        ok: false,
        data: None,
        error: Some(msg.into()),
    }
}

fn token_json(t: &TokenRecord) -> Value {
    let state = if t.revoked_at.is_some() {
        "revoked"
    } else if t.used_at.is_some() {
        "used"
    } else if t.expires_at <= time::OffsetDateTime::now_utc() {
        "expired"
    } else {
        "unused"
    };
    json!({
        "id": t.id, "spiffe_id": t.spiffe_id, "state": state, "created_by": t.created_by,
        "created_at": t.created_at.unix_timestamp(), "expires_at": t.expires_at.unix_timestamp(),
    })
}

/// The OS user name of a uid, for logs and records.
pub fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid:{uid}"))
}

/// Runs one admin request as `who` (an OS user on the socket, a user SPIFFE ID over mTLS).
pub(super) fn dispatch(ca: &Ca, who: &str, req: AdminRequest) -> AdminResponse {
    match req {
        AdminRequest::TokenCreate { spiffe_id, ttl } => {
            let ttl = match parse_duration(&ttl) {
                Ok(t) => t,
                Err(e) => return err(e.to_string()),
            };
            match ca.create_token(&spiffe_id, ttl, who) {
                Ok((token, rec)) => {
                    info!(token = %rec.id, spiffe_id = %rec.spiffe_id, by = who, "join token created");
                    let mut v = token_json(&rec);
                    v["token"] = Value::String(token.reveal().to_string());
                    ok(v)
                }
                Err(e) => err(e.to_string()),
            }
        }
        AdminRequest::TokenList => match ca.store().list_tokens() {
            Ok(list) => ok(Value::Array(list.iter().map(token_json).collect())),
            Err(e) => err(e.to_string()),
        },
        AdminRequest::TokenRevoke { id } => {
            match ca
                .store()
                .revoke_token(&id, time::OffsetDateTime::now_utc())
            {
                Ok(true) => {
                    ca.event("token.revoked", json!({ "token": id, "by": who }));
                    ok(json!({ "id": id, "state": "revoked" }))
                }
                Ok(false) => err(format!("no unused token with id {id}")),
                Err(e) => err(e.to_string()),
            }
        }
        AdminRequest::GrantRequest(req) => {
            match super::distribution::request(ca, &ca.dist, who, req) {
                Ok(g) => ok(serde_json::to_value(g).unwrap_or_default()),
                Err(e) => err(e.to_string()),
            }
        }
        AdminRequest::GrantDecide { id, action } => {
            match super::distribution::decide(ca, &ca.dist, who, &id, &action) {
                Ok(g) => ok(serde_json::to_value(g).unwrap_or_default()),
                Err(e) => err(e.to_string()),
            }
        }
        AdminRequest::GrantList => match super::distribution::list(ca) {
            Ok(l) => ok(serde_json::to_value(l).unwrap_or_default()),
            Err(e) => err(e.to_string()),
        },
        AdminRequest::EndpointsList => ok(serde_json::to_value(
            ca.registry.list(time::OffsetDateTime::now_utc()),
        )
        .unwrap_or_default()),
        AdminRequest::Status => match ca.authorities() {
            Ok(a) => ok(super::status_json(&a)),
            Err(e) => err(e.to_string()),
        },
        AdminRequest::PolicyShow => match ca.store().policy() {
            Ok(Some(p)) => ok(json!({
                "version": p.version, "source": p.source,
                "published_at": p.published_at, "published_by": p.published_by,
            })),
            Ok(None) => err("no policy is published (start the control plane with --policy)"),
            Err(e) => err(e.to_string()),
        },
        AdminRequest::AuditQuery(q) => audit_query(ca, q),
    }
}

fn audit_query(ca: &Ca, q: AuditQuery) -> AdminResponse {
    if let Some(d) = q.decision.as_deref()
        && !crate::identity::audit::DECISIONS.contains(&d)
    {
        return err(format!("decision must be allow or deny, not {d:?}"));
    }
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_AUDIT_EXPORT {
        return err(format!("limit must be 1..={MAX_AUDIT_EXPORT}"));
    }
    let filter = crate::server::store::AuditFilter {
        since_ms: q.since_ms,
        until_ms: q.until_ms,
        source: q.source,
        destination: q.destination,
        decision: q.decision,
        kind: q.kind,
        limit,
        ..Default::default()
    };
    match ca.store().audit_query(&filter) {
        Ok(lines) => ok(Value::Array(
            lines
                .iter()
                .filter_map(|l| serde_json::from_slice(l).ok())
                .collect(),
        )),
        Err(e) => err(e.to_string()),
    }
}

async fn serve_conn(ca: Arc<Ca>, stream: UnixStream) {
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => {
            warn!(error = %e, "admin socket: cannot read peer credentials");
            return;
        }
    };
    let who = user_name(uid);
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_LINE as u64 * 64)).lines();
    if !ca.settings().admin_uids.contains(&uid) {
        // Read the request first so the client is not cut off mid-write, then refuse.
        let _ = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await;
        warn!(user = %who, uid, "admin socket: user is not an admin");
        ca.event("admin.refused", json!({ "user": who, "uid": uid }));
        let line = serde_json::to_string(&err(format!(
            "user {who} (uid {uid}) is not a mayfly admin: add it with `mayfly-ca run --admin {who}`"
        )))
        .unwrap_or_default();
        let _ = w.write_all(format!("{line}\n").as_bytes()).await;
        return;
    }
    loop {
        let line = match tokio::time::timeout(Duration::from_secs(300), lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            _ => return,
        };
        let resp = if line.len() > MAX_LINE {
            err("request too long")
        } else {
            match serde_json::from_str::<AdminRequest>(&line) {
                Ok(req) => {
                    debug!(user = %who, request = %line, "admin request");
                    let ca2 = ca.clone();
                    let who2 = who.clone();
                    tokio::task::spawn_blocking(move || {
                        // The socket is break-glass: people use admin grants over mTLS.
                        ca2.event(
                            "admin.break_glass",
                            json!({ "os_user": who2, "uid": uid, "op": req.op() }),
                        );
                        dispatch(&ca2, &who2, req)
                    })
                    .await
                    .unwrap_or_else(|e| err(format!("internal error: {e}")))
                }
                Err(e) => err(format!("bad admin request: {e}")),
            }
        };
        let out = serde_json::to_string(&resp).unwrap_or_default();
        if w.write_all(format!("{out}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

use tokio::io::AsyncReadExt as _;

/// Binds the admin socket: mode 0600 (only its owner connects), or 0660 owned by `group` so
/// that the members of that group can connect too (`--admin-group`). Reaching the socket is not
/// enough to act: every request is still checked against the caller's OS user (SO_PEERCRED and
/// `--admin`).
pub fn bind(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let mode = match group {
        None => 0o600,
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid))?;
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Serves admin connections until shutdown.
pub async fn serve(ca: Arc<Ca>, listener: UnixListener, shutdown: watch::Receiver<bool>) {
    crate::accept::serve(
        "admin socket",
        listener,
        shutdown,
        crate::accept::Unlimited,
        |s, _| (tracing::Span::none(), serve_conn(ca.clone(), s)),
    )
    .await;
}

/// Why a request on the admin socket failed. Its text is what the CLI shows.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminCallError {
    /// The socket cannot be reached.
    #[error(
        "cannot reach the control plane's admin socket {}: {source} (is `mayfly-ca run` running on this data directory?)",
        socket.display()
    )]
    Connect {
        /// The socket.
        socket: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The request or the answer is not the expected JSON.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// No answer in time.
    #[error("the control plane did not answer within 30s")]
    Timeout,
    /// The connection closed before an answer.
    #[error("the control plane closed the admin connection")]
    Closed,
    /// The control plane refused the request; its message.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request to a running control plane's admin socket.
pub async fn call(socket: &Path, req: &AdminRequest) -> Result<Value, AdminCallError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| AdminCallError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let line = serde_json::to_string(req)?;
    w.write_all(format!("{line}\n").as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    let answer = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| AdminCallError::Timeout)??
        .ok_or(AdminCallError::Closed)?;
    let resp: AdminResponse = serde_json::from_str(&answer)?;
    if resp.ok {
        Ok(resp.data.unwrap_or(Value::Null))
    } else {
        Err(AdminCallError::Refused(
            resp.error.unwrap_or_else(|| "unknown error".into()),
        ))
    }
}
