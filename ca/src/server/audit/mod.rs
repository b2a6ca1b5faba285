//! Audit collection on the control plane: [`ingest`](mod@ingest) stores a sidecar's records (`POST
//! /v1/audit`: exactly once, in order, hash chain checked); [`anchors`] keeps the control
//! plane's own events a chain of their own, with anchors of the sidecar chains and signed
//! checkpoints; [`verify`] is `audit verify`, which checks every chain, and the rendering
//! `audit tail` and `audit query` print.
//!
//! All three are built on [`super::ca::Ca`]; what the `Ca` holds for them (the heads to anchor,
//! the events it could not store) is [`super::ca::Pending`].

pub mod anchors;
pub mod ingest;
pub mod verify;

#[cfg(test)]
mod tests;

pub use anchors::{
    ANCHOR_INTERVAL, ANCHOR_KIND, anchor, check_store, checkpoint_own, record_lost, settle,
};
pub use ingest::{IngestError, acked_body, ingest};
pub use verify::{ChainReport, render, verify_all, verify_some};
