//! The signing side: CA authorities and their rotation ([`authority`]) and issuing
//! X.509-SVIDs from CSRs ([`issue`]).
//!
//! Always built, beside the client side rather than under the server: the client builds its
//! CSRs with [`issue::make_csr`], and tests, benches and the test CA sign without a server. The
//! control plane (`crate::server`) holds the authorities and stores them.

pub mod authority;
pub mod issue;
