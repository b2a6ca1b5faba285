//! mayfly's identity authority.
//!
//! Two folders, one per side of the split the `server` feature draws:
//!
//! - [`identity`] (always built; the sidecar links only this, with `default-features = false`):
//!   SPIFFE IDs, the X.509-SVID profile, keys, trust bundles, peer verification, rustls
//!   configuration, join tokens, the API's wire types, the audit record format, the client
//!   of the control plane, and, in [`identity::signing`], the signing side (authorities and
//!   their rotation, issuance from CSRs), which tests, benches and offline tools use without a
//!   server.
//! - `server` (feature `server`): the control plane (`mayfly-ca run` and the offline commands
//!   on a data directory), with its store in `server::store`.
//!
//! Beside them, [`accept`] (always built): the one accept loop every listener of the workspace
//! runs (stop signal, backoff on accept errors, connection permit, per-connection span).
//!
//! The binary's command-line modules are in `src/cli/` (not part of the library).
//!
//! Every module keeps its old path too (`mayfly_ca::id`, `mayfly_ca::tls`, `mayfly_ca::store`,
//! ...): the re-exports below are the crate's public paths.

#![forbid(unsafe_code)]

pub mod accept;
pub mod identity;

#[cfg(feature = "server")]
pub mod server;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use identity::signing::{authority, issue};
pub use identity::{
    api, audit, bundle, client, duration, exposition, id, jwt, keys, report, svid, tls, token,
    verify,
};

#[cfg(feature = "server")]
pub use server::store;
