//! mayfly's identity authority.
//!
//! The client side (always built, linked by the sidecar): SPIFFE IDs ([`id`]), the X.509-SVID
//! profile ([`svid`]), trust bundles ([`bundle`]), peer verification ([`verify`]) and rustls
//! configuration ([`tls`]). The CA side: authorities and their rotation ([`authority`]) and
//! issuance from CSRs ([`issue`]). With the `server` feature: the control plane.

#![forbid(unsafe_code)]

pub mod accept;
pub mod api;
pub mod audit;
pub mod authority;
pub mod bundle;
pub mod client;
pub mod duration;
pub mod exposition;
pub mod id;
pub mod issue;
pub mod keys;
pub mod report;
pub mod svid;
pub mod tls;
pub mod token;
pub mod verify;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(feature = "server")]
pub mod store;

#[cfg(feature = "server")]
pub mod server;
