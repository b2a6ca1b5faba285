//! The Workload API's gRPC service. Every call is admitted in two steps: the caller's unix peer
//! credentials (SO_PEERCRED, carried into tonic by [`super::conn`]) must be allowed by
//! `allowed_uids` / `allowed_gids` (else `PermissionDenied`, an audit record and a count), then
//! the request must carry the `workload.spiffe.io: true` metadata (else `InvalidArgument`, as
//! the specification says). The streams send the current state at once and again at every
//! rotation or bundle change. JWT-SVIDs are minted by the control plane for the sidecar's own
//! SPIFFE ID ([`super::jwt`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use mayfly_ca::bundle::BundleSet;
use mayfly_ca::id::TrustDomainId;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::app_svid::{AppSvid, Published, same_roots};
use super::conn::PeerCred;
use super::jwt::{FetchError, JwtSource, jwt_bundles, same_jwt_keys, validate_in};
use super::pb;
use crate::audit::Auditor;
use crate::config::WorkloadApiConfig;
use crate::metrics::Metrics;

/// The metadata every Workload API request carries (SPIFFE Workload Endpoint §4.1).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// What `PermissionDenied` says to FetchX509SVID before the app's first SVID (SPIFFE
/// Workload Endpoint: "no identity issued", which clients retry).
pub const NO_IDENTITY_YET: &str =
    "no identity issued: the sidecar has not obtained the app's SVID yet (retry)";

impl PeerCred {
    fn fields(&self, method: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("method".into(), json!(method));
        m.insert("uid".into(), json!(self.uid));
        m.insert("gid".into(), json!(self.gid));
        m.insert("pid".into(), json!(self.pid));
        m
    }
}

/// The service.
pub struct WorkloadApi {
    cfg: Arc<WorkloadApiConfig>,
    state: watch::Receiver<Published>,
    audit: Arc<Auditor>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    jwt: Arc<JwtSource>,
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Every root of every trust domain, DER-encoded and concatenated, by trust domain ID.
fn bundles_der(set: &BundleSet) -> HashMap<String, Vec<u8>> {
    set.iter()
        .map(|b| {
            (
                TrustDomainId(b.trust_domain()).to_string(),
                b.roots().iter().flat_map(|r| r.iter().copied()).collect(),
            )
        })
        .collect()
}

fn svid_response(svid: &AppSvid, bundles: &BundleSet) -> pb::X509svidResponse {
    let td = svid.id.trust_domain();
    let bundle = bundles
        .get(td)
        .map(|b| b.roots().iter().flat_map(|r| r.iter().copied()).collect())
        .unwrap_or_default();
    let mut federated = bundles_der(bundles);
    federated.remove(&TrustDomainId(td).to_string());
    pb::X509svidResponse {
        svids: vec![pb::X509svid {
            spiffe_id: svid.id.to_string(),
            x509_svid: svid.chain.iter().flat_map(|c| c.iter().copied()).collect(),
            x509_svid_key: svid.key.pkcs8().to_vec(),
            bundle,
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: federated,
    }
}

/// What a FetchX509SVID stream sent last.
struct Sent {
    serial: String,
    bundles: Arc<BundleSet>,
}

/// What a FetchX509SVID stream sends next, and why (`start`, `rotation`, `bundle`): nothing
/// while no SVID is held or the bundle of its trust domain is not known yet (an SVID is never
/// handed out ahead of the bundle it verifies against), nor when nothing changed.
fn next_push<'a>(
    now: &'a Published,
    sent: Option<&Sent>,
) -> Option<(&'a Arc<AppSvid>, &'static str)> {
    let svid = now.svid.as_ref()?;
    now.bundles.get(svid.id.trust_domain())?;
    let push = match sent {
        None => "start",
        Some(s) if s.serial != svid.serial => "rotation",
        Some(s) if !same_roots(&s.bundles, &now.bundles) => "bundle",
        Some(_) => return None,
    };
    Some((svid, push))
}

impl WorkloadApi {
    /// A service handing out what `state` publishes.
    pub fn new(
        cfg: Arc<WorkloadApiConfig>,
        state: watch::Receiver<Published>,
        audit: Arc<Auditor>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
        jwt: Arc<JwtSource>,
    ) -> Self {
        Self {
            cfg,
            state,
            audit,
            metrics,
            shutdown,
            jwt,
        }
    }

    /// Admits a call: allowed peer credentials first, then the security header.
    fn admit<T>(&self, req: &Request<T>, method: &'static str) -> Result<PeerCred, Status> {
        let cred = req
            .extensions()
            .get::<Option<PeerCred>>()
            .copied()
            .flatten();
        let Some(caller) = cred else {
            self.metrics.workload_api_refused("no_peer_credentials");
            warn!(
                method,
                "Workload API: no peer credentials for the caller: refused"
            );
            return Err(Status::permission_denied(
                "no identity issued: the caller's peer credentials cannot be read",
            ));
        };
        if !self.cfg.allows(caller.uid, caller.gid) {
            self.metrics.workload_api_refused("caller_not_allowed");
            warn!(
                method,
                uid = caller.uid,
                gid = caller.gid,
                pid = caller.pid,
                "Workload API: caller not allowed"
            );
            self.audit
                .emit("workload_api.denied", caller.fields(method));
            return Err(Status::permission_denied(format!(
                "no identity issued: uid {} gid {} is not allowed to call this Workload API (workload_api.allowed_uids / allowed_gids)",
                caller.uid, caller.gid
            )));
        }
        match req.metadata().get(SECURITY_HEADER) {
            Some(v) if v.as_bytes() == b"true" => Ok(caller),
            _ => {
                self.metrics.workload_api_refused("security_header_missing");
                Err(Status::invalid_argument(
                    "security header missing from request",
                ))
            }
        }
    }

    /// A bundle stream (FetchX509Bundles, FetchJWTBundles): the bundles at once, then again
    /// whenever `same` says they changed, until the caller hangs up or the sidecar stops.
    /// Nothing is sent while no bundle is known.
    fn bundle_stream<T: Send + 'static>(
        &self,
        same: fn(&BundleSet, &BundleSet) -> bool,
        message: fn(&BundleSet) -> T,
    ) -> Out<T> {
        let mut state = self.state.clone();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut sent: Option<Arc<BundleSet>> = None;
            loop {
                let now = state.borrow_and_update().bundles.clone();
                let fresh = sent.as_ref().is_none_or(|b| !same(b, &now));
                if fresh && now.iter().next().is_some() {
                    if tx.send(Ok(message(&now))).await.is_err() {
                        return;
                    }
                    sent = Some(now);
                }
                tokio::select! {
                    r = state.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }

    /// Records an SVID handed to the app, and counts it.
    async fn record_svid(
        audit: &Auditor,
        metrics: &Metrics,
        caller: &PeerCred,
        svid: &AppSvid,
        push: &'static str,
    ) -> Result<(), Status> {
        let mut f = caller.fields("FetchX509SVID");
        f.insert("push".into(), json!(push));
        f.insert("serial".into(), json!(svid.serial));
        f.insert("not_after".into(), json!(svid.not_after.unix_timestamp()));
        audit
            .record("workload_api.svid", f)
            .await
            .map_err(|e| Status::unavailable(format!("the SVID cannot be audited: {e}")))?;
        metrics.workload_api_svid(push);
        info!(uid = caller.uid, pid = caller.pid, serial = %svid.serial, push, "Workload API: SVID handed to the app");
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::spiffe_workload_api_server::SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Out<pb::X509svidResponse>;
    type FetchX509BundlesStream = Out<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Out<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = self.admit(&req, "FetchX509SVID")?;
        // Nothing to hand out yet (the sidecar is still obtaining the app's SVID): answer as
        // the specification says, so that the client retries, rather than hold the call open.
        if next_push(&self.state.borrow(), None).is_none() {
            self.metrics.workload_api_refused("no_identity_yet");
            info!(
                uid = caller.uid,
                pid = caller.pid,
                "Workload API: no SVID for the app yet"
            );
            return Err(Status::permission_denied(NO_IDENTITY_YET));
        }
        let mut state = self.state.clone();
        let mut shutdown = self.shutdown.clone();
        let (audit, metrics) = (self.audit.clone(), self.metrics.clone());
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut sent: Option<Sent> = None;
            loop {
                let now = state.borrow_and_update().clone();
                if let Some((svid, push)) = next_push(&now, sent.as_ref()) {
                    if let Err(s) = Self::record_svid(&audit, &metrics, &caller, svid, push).await {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    if tx
                        .send(Ok(svid_response(svid, &now.bundles)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    sent = Some(Sent {
                        serial: svid.serial.clone(),
                        bundles: now.bundles.clone(),
                    });
                }
                tokio::select! {
                    r = state.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.admit(&req, "FetchX509Bundles")?;
        Ok(Response::new(self.bundle_stream(same_roots, |now| {
            pb::X509BundlesResponse {
                crl: Vec::new(),
                bundles: bundles_der(now),
            }
        })))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let caller = self.admit(&req, "FetchJWTSVID")?;
        let r = req.into_inner();
        let (token, cached) = match self.jwt.fetch(&r.audience, &r.spiffe_id).await {
            Ok(t) => t,
            Err(e @ FetchError::Invalid(_)) => {
                self.metrics.workload_api_refused("jwt_bad_request");
                return Err(Status::invalid_argument(e.to_string()));
            }
            Err(e @ FetchError::Unavailable(_)) => {
                self.metrics.workload_api_refused("jwt_unavailable");
                warn!(error = %e, "Workload API: no JWT-SVID for the app");
                return Err(Status::unavailable(e.to_string()));
            }
        };
        let mut f = caller.fields("FetchJWTSVID");
        f.insert("audience".into(), json!(r.audience));
        f.insert("cached".into(), json!(cached));
        self.audit
            .record("workload_api.jwt_svid", f)
            .await
            .map_err(|e| Status::unavailable(format!("the JWT-SVID cannot be audited: {e}")))?;
        self.metrics.workload_api_svid("jwt");
        info!(uid = caller.uid, pid = caller.pid, audience = ?r.audience, cached, "Workload API: JWT-SVID handed to the app");
        Ok(Response::new(pb::JwtsvidResponse {
            svids: vec![pb::Jwtsvid {
                spiffe_id: self.jwt.id().to_string(),
                svid: token,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.admit(&req, "FetchJWTBundles")?;
        Ok(Response::new(self.bundle_stream(same_jwt_keys, |now| {
            pb::JwtBundlesResponse {
                bundles: jwt_bundles(now),
            }
        })))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let caller = self.admit(&req, "ValidateJWTSVID")?;
        let r = req.into_inner();
        if r.svid.is_empty() {
            self.metrics.workload_api_refused("jwt_bad_request");
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let bundles = self.state.borrow().bundles.clone();
        let mut f = caller.fields("ValidateJWTSVID");
        f.insert("audience".into(), json!(r.audience));
        match validate_in(&bundles, &r.svid, &r.audience) {
            Ok((id, claims)) => {
                f.insert("spiffe_id".into(), json!(id.to_string()));
                f.insert("valid".into(), json!(true));
                self.audit.emit("workload_api.jwt_validated", f);
                Ok(Response::new(pb::ValidateJwtsvidResponse {
                    spiffe_id: id.to_string(),
                    claims: Some(claims),
                }))
            }
            Err(e) => {
                self.metrics.workload_api_refused("jwt_invalid");
                f.insert("valid".into(), json!(false));
                f.insert("error".into(), json!(e.to_string()));
                self.audit.emit("workload_api.jwt_validated", f);
                info!(uid = caller.uid, pid = caller.pid, error = %e, "Workload API: JWT-SVID refused");
                Err(Status::invalid_argument(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use mayfly_ca::keys::SecretKey;
    use mayfly_ca::testing::{Leaf, TestCa};

    use super::*;

    fn svid(ca: &TestCa, serial: &str) -> Arc<AppSvid> {
        let (chain, _) = ca.leaf(&Leaf::new("spiffe://mayfly.test/orders"));
        Arc::new(AppSvid::for_tests(
            mayfly_ca::id::parse_id("spiffe://mayfly.test/orders").unwrap(),
            chain,
            SecretKey::generate().unwrap(),
            serial,
        ))
    }

    #[test]
    fn an_svid_is_pushed_at_start_at_rotation_and_with_a_new_bundle_but_never_ahead_of_its_bundle()
    {
        let ca = TestCa::new("mayfly.test");
        let mut now = Published {
            svid: Some(svid(&ca, "01")),
            bundles: Arc::new(BundleSet::default()),
        };
        // The bundle of the SVID's trust domain is not known yet: nothing is handed out.
        assert!(next_push(&now, None).is_none());
        now.bundles = Arc::new(BundleSet::single(ca.bundle()));
        assert_eq!(next_push(&now, None).unwrap().1, "start");
        let sent = Sent {
            serial: "01".into(),
            bundles: now.bundles.clone(),
        };
        assert!(next_push(&now, Some(&sent)).is_none(), "nothing changed");
        // A new set with the same roots (the JWT keys changed) is no new X.509 bundle.
        let same = Published {
            svid: now.svid.clone(),
            bundles: Arc::new(BundleSet::single(ca.bundle())),
        };
        assert!(next_push(&same, Some(&sent)).is_none(), "same roots");
        let bundle_changed = Published {
            svid: now.svid.clone(),
            bundles: Arc::new(BundleSet::single(TestCa::new("mayfly.test").bundle())),
        };
        assert_eq!(next_push(&bundle_changed, Some(&sent)).unwrap().1, "bundle");
        now.svid = Some(svid(&ca, "02"));
        assert_eq!(next_push(&now, Some(&sent)).unwrap().1, "rotation");
        now.svid = None;
        assert!(next_push(&now, Some(&sent)).is_none());
    }
}
