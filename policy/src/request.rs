//! What the data plane asks about.

use std::net::IpAddr;

use time::OffsetDateTime;

/// One connection or HTTP request to decide on.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The peer's SPIFFE ID, from its verified X.509-SVID.
    pub source: &'a str,
    /// The local workload's SPIFFE ID (the destination).
    pub destination: &'a str,
    /// The destination port, if known.
    pub port: Option<u16>,
    /// The peer's IP address, if known.
    pub source_ip: Option<IpAddr>,
    /// The HTTP request, or `None` for a raw (L4) connection.
    pub http: Option<HttpRequest<'a>>,
    /// The time of the request (the engine never reads the clock).
    pub now: OffsetDateTime,
}

/// The HTTP part of a request.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    /// The method, as sent (methods are case-sensitive).
    pub method: &'a str,
    /// The path, ALREADY normalised with [`crate::normalize_path`]. A path that is not in
    /// normal form is denied (`DecidedBy::UnnormalizedPath`).
    pub path: &'a str,
    /// The request headers as (name, value) pairs; names compare case-insensitively.
    pub headers: &'a [(&'a str, &'a str)],
}
