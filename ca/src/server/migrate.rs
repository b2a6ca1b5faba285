//! `mayfly-ca store migrate`: copies a store into an empty one (SQLite to PostgreSQL, to move
//! to replicas): the settings `init` fixed, join tokens as they are (used, revoked), the
//! issued-certificate log, every audit chain (the control plane's own events included, each
//! appended with its hash chain checked), grants, and the CA authorities last (in PostgreSQL
//! their keys are sealed under the destination's KEK). Then every chain is verified in the
//! destination against the copied bundle.

use crate::identity::audit::ChainError;
use crate::identity::bundle::BundleSet;
use crate::server::store::{AuditConflict, GrantState, Store, StoreError};

/// Settings written by `init` or the store itself that the copy keeps (the trust domain and
/// bundle sequence travel with the authorities).
const SETTINGS: &[&str] = &["root_ttl", "intermediate_ttl", "audit_epoch"];

/// Audit rows appended per call.
const BATCH: usize = 1000;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The destination already holds data.
    #[error("the destination is not empty ({0}): migrate into a new, empty database")]
    NotEmpty(&'static str),
    /// The source holds no CA.
    #[error("the source store holds no CA (run `mayfly-ca init` on it first)")]
    NoCa,
    /// A stored grant does not parse.
    #[error("grant in the source is unreadable: {0}")]
    Grant(String),
    /// A chain would not continue in the destination.
    #[error("audit chain {chain} cannot be copied: {conflict}")]
    Conflict {
        /// The chain.
        chain: String,
        /// Why.
        conflict: AuditConflict,
    },
    /// A copied chain does not verify in the destination.
    #[error("audit chain {chain} does not verify in the destination: {error}")]
    Broken {
        /// The chain.
        chain: String,
        /// The first broken record.
        error: ChainError,
    },
    /// The trust bundle of the copied authorities is invalid.
    #[error("{0}")]
    Bundle(String),
    /// A store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What was copied.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Migrated {
    /// Join tokens.
    pub tokens: usize,
    /// Issued-certificate log entries.
    pub issued: usize,
    /// Audit chains (all verified in the destination).
    pub chains: usize,
    /// Audit records (the control plane's events included).
    pub records: usize,
    /// Grants.
    pub grants: usize,
    /// CA authorities.
    pub authorities: usize,
}

/// Copies `from` into the empty store `to`, then verifies every chain in `to`.
pub fn migrate(from: &dyn Store, to: &dyn Store) -> Result<Migrated, MigrateError> {
    if to.trust_domain()?.is_some() {
        return Err(MigrateError::NotEmpty("it holds a CA"));
    }
    if !to.audit_chains()?.is_empty() {
        return Err(MigrateError::NotEmpty("it holds audit records"));
    }
    if !to.list_tokens()?.is_empty() || !to.list_issued(1)?.is_empty() {
        return Err(MigrateError::NotEmpty(
            "it holds tokens or issued certificates",
        ));
    }
    if !to.list_grants()?.is_empty() {
        return Err(MigrateError::NotEmpty("it holds grants"));
    }
    let config = super::authority_config(from).map_err(|e| match e {
        super::ServerError::Store(s) => MigrateError::Store(s),
        other => MigrateError::Store(StoreError::Db(other.to_string())),
    })?;
    let authorities = from.load_authorities(config)?.ok_or(MigrateError::NoCa)?;
    let mut done = Migrated::default();
    for key in SETTINGS {
        if let Some(v) = from.setting(key)? {
            to.set_setting(key, &v)?;
        }
    }
    for t in from.list_tokens()?.iter().rev() {
        to.insert_token(t)?;
        done.tokens += 1;
    }
    for rec in from.list_issued(u32::MAX)?.iter().rev() {
        to.log_issued(rec)?;
        done.issued += 1;
    }
    for chain in from.audit_chains()? {
        let rows = from.audit_rows(&chain)?;
        for batch in rows.chunks(BATCH) {
            to.audit_append(&chain, batch)?
                .map_err(|conflict| MigrateError::Conflict {
                    chain: chain.clone(),
                    conflict,
                })?;
        }
        done.records += rows.len();
        done.chains += 1;
    }
    for body in from.list_grants()?.iter().rev() {
        let v: serde_json::Value =
            serde_json::from_str(body).map_err(|e| MigrateError::Grant(e.to_string()))?;
        let id = v["id"]
            .as_str()
            .ok_or_else(|| MigrateError::Grant(format!("no id in {body}")))?;
        let state: GrantState = serde_json::from_value(v["state"].clone())
            .map_err(|e| MigrateError::Grant(format!("grant {id}: {e}")))?;
        to.insert_grant(id, state, v["expires"].as_i64().unwrap_or(0), body)?;
        done.grants += 1;
    }
    // Last: a destination holding authorities is an initialised one.
    to.save_authorities(&authorities)?;
    done.authorities = authorities.all().len();
    let bundle = super::bundle_of(&authorities).map_err(|e| MigrateError::Bundle(e.to_string()))?;
    for report in super::audit::verify_all(to, &BundleSet::single(bundle))? {
        if let Err(error) = report.result {
            return Err(MigrateError::Broken {
                chain: report.chain,
                error,
            });
        }
    }
    Ok(done)
}
