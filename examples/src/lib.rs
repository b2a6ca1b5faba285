//! The sample services of the mayfly quickstart: `web` (a front end), `orders` (an HTTP API)
//! and `db` (a line-based TCP key-value store). Each is a real server on a real socket; the
//! binaries in `src/bin/` run them on their own, and the quickstart runs them in its own
//! process beside the real `mayfly-ca` and `mayfly-sidecar` processes.

pub mod db;
pub mod idp;
pub mod orders;
pub mod web;
pub mod xfcc;
