//! The audit record of one HTTP request.

use http::StatusCode;

/// The audit record of one HTTP request. Batched durability: one `http.request` record, emitted
/// once the caller's status is known. Strict: the `http.request` record (the decision, without
/// a status) is made durable before the request is forwarded, and an `http.response` record
/// (same request line and decision ID, with the status) follows when the answer is known; a
/// denial is one `http.request` record with its 403, durable before the 403 is sent.
pub(crate) struct RequestRecord<'a> {
    audit: &'a crate::audit::Auditor,
    fields: serde_json::Map<String, serde_json::Value>,
    started: std::time::Instant,
    /// The decision is recorded already (strict): `finish` records only the outcome.
    decided: bool,
}

/// The fields an `http.response` record repeats from its `http.request` record.
const RESPONSE_FIELDS: [&str; 8] = [
    "error",
    "direction",
    "local_id",
    "peer_id",
    "protocol",
    "method",
    "path",
    "decision_id",
];

impl<'a> RequestRecord<'a> {
    /// `base` (from `conn::audit_base`) plus the request line and the policy's verdict.
    pub(crate) fn new(
        audit: &'a crate::audit::Auditor,
        mut base: serde_json::Map<String, serde_json::Value>,
        method: &http::Method,
        path: &str,
        verdict: &crate::policy::Verdict,
        started: std::time::Instant,
    ) -> Self {
        base.insert("method".into(), method.as_str().into());
        base.insert("path".into(), path.into());
        verdict.audit_into(&mut base);
        Self {
            audit,
            fields: base,
            started,
            decided: false,
        }
    }

    /// The address the request is sent to (known once its endpoint is chosen).
    pub(crate) fn peer_addr(&mut self, addr: &str) {
        self.fields.insert("peer_addr".into(), addr.into());
    }

    /// Why no answer from the upstream is relayed (`timeout`, `upstream_unreachable`...).
    pub(crate) fn error(&mut self, reason: &str) {
        self.fields.insert("error".into(), reason.into());
    }

    /// Before the request is forwarded. Strict: records the decision and waits until it is
    /// durable; an error means the request must be refused. Batched: nothing yet.
    pub(crate) async fn before_forwarding(&mut self) -> Result<(), crate::audit::NotDurable> {
        if self.audit.durability() != crate::audit::Durability::Strict {
            return Ok(());
        }
        self.decided = true;
        self.audit.record("http.request", self.fields.clone()).await
    }

    fn outcome(&mut self, status: StatusCode) {
        if self.decided {
            self.fields
                .retain(|k, _| RESPONSE_FIELDS.contains(&k.as_str()));
        }
        self.fields.insert("status".into(), status.as_u16().into());
        self.fields.insert(
            "duration_ms".into(),
            (self.started.elapsed().as_millis() as u64).into(),
        );
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
