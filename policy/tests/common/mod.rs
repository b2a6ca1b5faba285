//! Test helpers: loading policies and building requests.
#![allow(dead_code, unreachable_pub)]

use mayfly_policy::{Engine, HttpRequest, Policy, Request};
use time::OffsetDateTime;
use time::macros::datetime;

/// Monday 2026-03-02 10:00 UTC (11:00 in Paris).
pub const NOW: OffsetDateTime = datetime!(2026-03-02 10:00 UTC);

pub const WEB: &str = "spiffe://mayfly.local/web";
pub const ORDERS: &str = "spiffe://mayfly.local/orders";
pub const DB: &str = "spiffe://mayfly.local/db";

/// Loads a policy body (the `version = 1` line is added), panicking with the diagnostics.
pub fn engine(body: &str) -> Engine {
    let src = format!("version = 1\n{body}");
    match Policy::from_toml(&src, "test.toml") {
        Ok(l) => l.policy.compile(),
        Err(e) => panic!("policy should load:\n{e}\n---\n{src}"),
    }
}

/// The errors of an invalid policy body, as `line:col: message` strings.
pub fn errors(body: &str) -> Vec<String> {
    let src = format!("version = 1\n{body}");
    match Policy::from_toml(&src, "test.toml") {
        Ok(_) => panic!("policy should be refused:\n{src}"),
        Err(e) => e
            .diagnostics
            .iter()
            .map(|d| format!("{}:{}: {}", d.line, d.col, d.message))
            .collect(),
    }
}

/// A connection from `source` to `destination` on port 8080 at [`NOW`].
pub fn conn<'a>(source: &'a str, destination: &'a str) -> Request<'a> {
    Request {
        source,
        destination,
        port: Some(8080),
        source_ip: None,
        http: None,
        now: NOW,
    }
}

/// An HTTP request without headers.
pub fn http<'a>(
    source: &'a str,
    destination: &'a str,
    method: &'a str,
    path: &'a str,
) -> Request<'a> {
    Request {
        http: Some(HttpRequest {
            method,
            path,
            headers: &[],
        }),
        ..conn(source, destination)
    }
}

/// A rule from WEB to ORDERS with extra TOML lines.
pub fn rule(name: &str, action: &str, extra: &str) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\naction = \"{action}\"\nfrom = [\"{WEB}\"]\nto = [\"{ORDERS}\"]\n{extra}\n"
    )
}
