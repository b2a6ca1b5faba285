//! `x-forwarded-client-cert` (Envoy's format) as mayfly's inbound sidecar sets it in HTTP mode:
//! `By=<the local workload's SPIFFE ID>;Hash=<hex SHA-256 of the caller's certificate>;URI=<the
//! caller's SPIFFE ID>`. The sidecar removes any such header the caller sent, so an app behind
//! a mayfly sidecar can trust it.

use http::HeaderMap;

/// The header's name.
pub const HEADER: &str = "x-forwarded-client-cert";

/// One parsed element.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// `By`: who received the call.
    pub by: Option<String>,
    /// `Hash`: hex SHA-256 of the caller's certificate (DER).
    pub hash: Option<String>,
    /// `URI`: the caller's SPIFFE ID.
    pub uri: Option<String>,
}

/// Parses one element (`Key=value;Key=value`, values optionally in double quotes).
pub fn parse(value: &str) -> Element {
    let mut e = Element::default();
    for part in value.split(';') {
        let Some((k, v)) = part.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_owned();
        match k.trim().to_ascii_lowercase().as_str() {
            "by" => e.by = Some(v),
            "hash" => e.hash = Some(v),
            "uri" => e.uri = Some(v),
            _ => {}
        }
    }
    e
}

/// The caller's SPIFFE ID, when the request carries exactly one header with one element that
/// names it; `None` otherwise (no sidecar in HTTP mode in front, or something odd).
pub fn caller(headers: &HeaderMap) -> Option<String> {
    let mut all = headers.get_all(HEADER).iter();
    let (Some(v), None) = (all.next(), all.next()) else {
        return None;
    };
    let v = v.to_str().ok()?;
    if v.contains(',') {
        return None;
    }
    parse(v).uri
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_sidecars_header() {
        let e = parse("By=spiffe://mayfly.local/orders;Hash=ab01;URI=spiffe://mayfly.local/web");
        assert_eq!(e.by.as_deref(), Some("spiffe://mayfly.local/orders"));
        assert_eq!(e.hash.as_deref(), Some("ab01"));
        assert_eq!(e.uri.as_deref(), Some("spiffe://mayfly.local/web"));
        let mut h = HeaderMap::new();
        assert_eq!(caller(&h), None);
        h.append(HEADER, http::HeaderValue::from_static("URI=spiffe://td/a"));
        assert_eq!(caller(&h).as_deref(), Some("spiffe://td/a"));
        h.append(HEADER, http::HeaderValue::from_static("URI=spiffe://td/b"));
        assert_eq!(caller(&h), None, "two headers: ambiguous");
    }
}
