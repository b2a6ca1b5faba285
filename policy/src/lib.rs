//! mayfly's policy language and decision engine.
//!
//! A policy is a TOML file of SPIFFE-ID rules (see `POLICY.md`): default deny, deny beats allow,
//! literal matching only. [`Policy::from_toml`] validates it and reports every error with
//! `file:line:col`; [`Policy::compile`] builds an [`Engine`] that answers
//! [`Engine::decide`] in well under a microsecond, and [`Engine::explain`] says why.
//!
//! This crate does no I/O: the caller passes the time (`Request::now`) and the seed for
//! decision ids (`Engine::with_seed`).
//!
//! ```
//! use mayfly_policy::{HttpRequest, Policy, Request};
//!
//! let src = r#"
//! version = 1
//! [[rule]]
//! name = "web-reads-orders"
//! from = ["spiffe://mayfly.local/web"]
//! to = ["spiffe://mayfly.local/orders"]
//! methods = ["GET"]
//! paths = ["/orders/**"]
//! "#;
//! let loaded = Policy::from_toml(src, "policy.toml").expect("valid policy");
//! let engine = loaded.policy.compile();
//! let req = Request {
//!     source: "spiffe://mayfly.local/web",
//!     destination: "spiffe://mayfly.local/orders",
//!     port: Some(8080),
//!     source_ip: None,
//!     http: Some(HttpRequest { method: "GET", path: "/orders/42", headers: &[] }),
//!     now: time::OffsetDateTime::UNIX_EPOCH,
//! };
//! assert!(engine.decide(&req, &[]).allow);
//! ```

mod access;
mod decision;
mod diag;
mod duration;
mod engine;
mod grant;
mod load;
mod model;
mod path;
mod pattern;
mod request;
mod spiffe_id;
mod timewin;

pub use access::{AccessAsk, AccessRefusal, AccessRule, AccessTarget, find_rule};
pub use decision::{DecidedBy, Decision, DryRun};
pub use diag::{Diagnostic, PolicyError, Pos, Severity};
pub use duration::{DurationError, format_duration, parse_duration};
pub use engine::{Engine, Explanation, Step};
pub use grant::{Grant, GrantError};
pub use model::{Action, GrantSettings, Loaded, Mode, Policy, Protocol, Rule, Service};
pub use path::{PathError, deny_form, is_normalized, normalize_path};
pub use pattern::{PathPattern, PatternError};
pub use request::{HttpRequest, Request};
pub use spiffe_id::{IdError, IdPattern, IdPatternError, validate_spiffe_id};
pub use timewin::{TimeWindow, TimeWindowError};
