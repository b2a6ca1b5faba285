//! The always-built side of `mayfly-ca`: what a workload's sidecar needs to hold, present and
//! check a SPIFFE identity, and to talk to the control plane.
//!
//! Lowest first: SPIFFE IDs ([`id`]), keys and hashes ([`keys`]), durations ([`duration`]), the
//! X.509-SVID profile ([`svid`]), trust bundles ([`bundle`]), the crypto provider ([`crypto`]),
//! peer verification ([`verify`]) and rustls configuration ([`tls`]); join tokens ([`token`]),
//! the API's wire types ([`api`]), the audit record format and chain check ([`audit`]), metrics
//! exposition formats ([`exposition`]) and error reports ([`report`]); the signing side
//! ([`signing`]: authorities and issuance); on top, the client of the control plane
//! ([`client`]).

pub mod api;
pub mod audit;
pub mod bundle;
pub mod client;
pub mod crypto;
pub mod duration;
pub mod exposition;
pub mod id;
pub mod jwt;
pub mod keys;
pub mod oidc;
pub mod report;
pub mod signing;
pub mod svid;
pub mod tls;
pub mod token;
pub mod verify;
