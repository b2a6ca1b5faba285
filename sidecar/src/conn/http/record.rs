//! The audit record of one HTTP request.

use http::StatusCode;

use crate::audit::{Field, FieldList};

/// The audit record of one HTTP request. Batched durability: one `http.request` record, emitted
/// once the caller's status is known. Strict: the `http.request` record (the decision, without
/// a status) is made durable before the request is forwarded, and an `http.response` record
/// (same request line and decision ID, with the status) follows when the answer is known; a
/// denial is one `http.request` record with its 403, durable before the 403 is sent.
pub(crate) struct RequestRecord<'a> {
    audit: &'a crate::audit::Auditor,
    fields: FieldList,
    started: std::time::Instant,
    /// The decision is recorded already (strict): `finish` records only the outcome.
    decided: bool,
    /// Whether the policy allowed it (dry-run denials count as denials).
    allowed: bool,
    /// The peer's request series, counted when the outcome is known.
    series: Option<std::sync::Arc<crate::metrics::PeerSeries>>,
}

/// The fields an `http.response` record repeats from its `http.request` record.
pub const RESPONSE_FIELDS: [&str; 9] = [
    "error",
    "direction",
    "local_id",
    "peer_id",
    "protocol",
    "method",
    "path",
    "decision_id",
    "trace_id",
];

/// The most fields a request's record adds to its connection's (request line, verdict,
/// port, trace, address, error, outcome): the record's one allocation holds them all.
const REQUEST_FIELDS: usize = 16;

impl<'a> RequestRecord<'a> {
    /// `base` (the connection's, from `conn::audit_base_fields`) plus the request line and the
    /// policy's verdict.
    pub(crate) fn new(
        audit: &'a crate::audit::Auditor,
        base: &FieldList,
        method: &http::Method,
        path: &str,
        verdict: &crate::policy::Verdict,
        started: std::time::Instant,
    ) -> Self {
        let mut fields = base.with_room(REQUEST_FIELDS);
        fields.insert("method", method_field(method));
        fields.insert("path", Field::Owned(path.to_owned()));
        verdict.audit_fields(&mut fields);
        Self {
            audit,
            fields,
            started,
            decided: false,
            allowed: verdict.label() == "allow",
            series: None,
        }
    }

    /// The port the policy decided on (a replay needs it) and, when the request carries a W3C
    /// `traceparent` (else a B3 trace ID), its trace ID: the decision joins the trace. The
    /// outcome is counted in `series` (the peer's, resolved once per connection or upstream).
    pub(crate) fn context(
        &mut self,
        port: Option<u16>,
        headers: &http::HeaderMap,
        series: &std::sync::Arc<crate::metrics::PeerSeries>,
    ) {
        self.series = Some(series.clone());
        if let Some(p) = port {
            self.fields.insert("port", Field::U64(p.into()));
        }
        if let Some(t) = trace_id(headers) {
            self.fields.insert("trace_id", Field::Owned(t.to_owned()));
        }
    }

    /// The address the request is sent to (known once its endpoint is chosen).
    pub(crate) fn peer_addr(&mut self, addr: &str) {
        self.fields
            .insert("peer_addr", Field::Owned(addr.to_owned()));
    }

    /// Why no answer from the upstream is relayed (`timeout`, `upstream_unreachable`...).
    pub(crate) fn error(&mut self, reason: &str) {
        self.fields.insert("error", Field::Owned(reason.to_owned()));
    }

    /// Before the request is forwarded. Strict: records the decision and waits until it is
    /// durable; an error means the request must be refused. Batched: nothing yet.
    pub(crate) async fn before_forwarding(&mut self) -> Result<(), crate::audit::NotDurable> {
        if self.audit.durability() != crate::audit::Durability::Strict {
            return Ok(());
        }
        self.decided = true;
        // The decision's record takes the fields; the response keeps only what it repeats.
        let response = self
            .fields
            .subset(|k| RESPONSE_FIELDS.contains(&k), RESPONSE_FIELDS.len());
        let request = std::mem::replace(&mut self.fields, response);
        self.audit.record("http.request", request).await
    }

    fn outcome(&mut self, status: StatusCode) {
        if self.decided {
            self.fields.retain(|k| RESPONSE_FIELDS.contains(&k));
        }
        let elapsed = self.started.elapsed();
        if let Some(series) = &self.series {
            series.observe(self.allowed, status.as_u16(), elapsed.as_secs_f64());
        }
        self.fields
            .insert("status", Field::U64(status.as_u16().into()));
        self.fields
            .insert("duration_ms", Field::U64(elapsed.as_millis() as u64));
    }

    /// Records the outcome of a forwarded request (never waits).
    pub(crate) fn finish(mut self, status: StatusCode) {
        self.outcome(status);
        let kind = if self.decided {
            "http.response"
        } else {
            "http.request"
        };
        self.audit.emit(kind, self.fields);
    }

    /// Records a request answered here without forwarding it (a denial). Strict: waits until
    /// the record is durable; an error means the answer must be a refusal instead.
    pub(crate) async fn finish_unforwarded(
        mut self,
        status: StatusCode,
    ) -> Result<(), crate::audit::NotDurable> {
        self.outcome(status);
        self.audit.record("http.request", self.fields).await
    }
}

/// A standard method's name without a copy; any other, copied.
fn method_field(method: &http::Method) -> Field {
    use http::Method;
    let name = match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return Field::Owned(method.as_str().to_owned()),
    };
    Field::Static(name)
}

/// The trace ID of `traceparent` (`VERSION-TRACEID-PARENTID-FLAGS`, 32 lowercase hex digits,
/// not all zero), else of `b3` (`TRACEID-SPANID...`) or `x-b3-traceid` (16 or 32 hex digits).
pub(crate) fn trace_id(headers: &http::HeaderMap) -> Option<&str> {
    fn hex(s: &str, lens: &[usize]) -> bool {
        lens.contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
    // A trace ID of all zeros is invalid in both formats.
    let id_ok = |s: &str, lens: &[usize]| hex(s, lens) && s.bytes().any(|b| b != b'0');
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(tp) = value("traceparent") {
        let mut parts = tp.trim().split('-');
        let (version, id) = (parts.next()?, parts.next()?);
        return (hex(version, &[2]) && version != "ff" && id_ok(id, &[32])).then_some(id);
    }
    let b3 = value("b3").and_then(|v| v.trim().split('-').next());
    let id = b3.or_else(|| value("x-b3-traceid").map(str::trim))?;
    id_ok(id, &[16, 32]).then_some(id)
}

#[cfg(test)]
mod trace_tests {
    use super::trace_id;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_trace_id_comes_from_traceparent_then_b3() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id(&headers(&[
                ("traceparent", tp),
                ("b3", "80f198ee56343ba8-e457b5a2e4d86bd1")
            ])),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            trace_id(&headers(&[("b3", "80f198ee56343ba8-e457b5a2e4d86bd1-1")])),
            Some("80f198ee56343ba8")
        );
        assert_eq!(
            trace_id(&headers(&[(
                "x-b3-traceid",
                "463ac35c9f6413ad48485a3953bb6124"
            )])),
            Some("463ac35c9f6413ad48485a3953bb6124")
        );
    }

    #[test]
    fn a_malformed_or_zero_trace_id_is_not_recorded() {
        for tp in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f35",
            "garbage",
        ] {
            assert_eq!(trace_id(&headers(&[("traceparent", tp)])), None, "{tp}");
        }
        assert_eq!(trace_id(&http::HeaderMap::new()), None);
    }
}
