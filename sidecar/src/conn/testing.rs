//! A sidecar's connection layer in-process, for tests: a test CA, our SVID, the real policy
//! engine and a real audit spool (strict, with a JSON-lines copy to read back), the inbound
//! listener on 127.0.0.1:0, and peers dialling it with SVIDs of their own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mayfly_ca::bundle::BundleSet;
use mayfly_ca::testing::TestCa;
use mayfly_ca::tls::{Credentials, client_config, dial_name};
use mayfly_ca::verify::{IdMatcher, SharedBundles};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsConnector;

use super::Shared;
use crate::audit::{self, AuditConfig, Durability, Sink, WhenFull};
use crate::config::{
    AppProtocol, ControlPlane, Inbound, Limits, Protocol, TokenSource, UnderscoreHeaders,
};
use crate::identity::Identity;
use crate::metrics::{Direction, FailLabels, Metrics};
use crate::policy::PolicyState;

/// The sidecar under test.
pub(crate) const ME: &str = "spiffe://mayfly.test/orders";
/// A peer the policy lets in (every request but `/admin`).
pub(crate) const WEB: &str = "spiffe://mayfly.test/web";
/// A peer the policy lets in nowhere.
pub(crate) const BATCH: &str = "spiffe://mayfly.test/batch";

const POLICY: &str = r#"
version = 1

[[rule]]
name = "web-to-orders"
from = ["spiffe://mayfly.test/web"]
to = ["spiffe://mayfly.test/orders"]

[[rule]]
name = "no-admin"
action = "deny"
from = ["spiffe://mayfly.test/*"]
to = ["spiffe://mayfly.test/orders"]
paths = ["/admin", "/admin/**"]
"#;

/// A sidecar's shared state with a fresh SVID from its own test CA.
pub(crate) struct Side {
    pub(crate) ca: TestCa,
    pub(crate) shared: Arc<Shared>,
    pub(crate) metrics: Arc<Metrics>,
    audit_log: PathBuf,
    _dir: tempfile::TempDir,
    _hard: watch::Sender<bool>,
}

/// The policy in force in these tests, on its own.
pub(crate) fn policy(metrics: Arc<Metrics>) -> Arc<PolicyState> {
    let policy = PolicyState::new(None, metrics);
    let loaded =
        mayfly_policy::Policy::from_toml_at(POLICY, "test", time::OffsetDateTime::now_utc())
            .unwrap();
    policy.install(&loaded.policy);
    policy
}

impl Side {
    /// At most `max_connections` open at once.
    pub(crate) fn new(max_connections: usize) -> Self {
        let ca = TestCa::new("mayfly.test");
        let metrics = Arc::new(Metrics::new());
        let identity = Identity::new(
            mayfly_ca::id::parse_id(ME).unwrap(),
            ControlPlane {
                // Never dialled: the SVID is installed below.
                address: "127.0.0.1:9".into(),
                token: TokenSource::Env("MAYFLY_TEST_UNUSED".into()),
                ca_pin: None,
                svid_ttl: None,
            },
            metrics.clone(),
        )
        .unwrap();
        let (chain, key) = ca.svid(ME);
        identity
            .creds
            .set(mayfly_ca::tls::Svid::new(chain, &key).unwrap());
        identity
            .bundles
            .store(Arc::new(BundleSet::single(ca.bundle())));
        let dir = tempfile::tempdir().unwrap();
        let audit_log = dir.path().join("audit.jsonl");
        let (hard, hard_stop) = watch::channel(false);
        let (auditor, _) = audit::start(
            AuditConfig {
                spool_dir: dir.path().join("spool"),
                max_spool_bytes: 64 << 20,
                when_full: WhenFull::FailClosed,
                sink: Sink::File(audit_log.clone()),
                ship: false,
                durability: Durability::Strict,
            },
            identity.clone(),
            None,
            metrics.clone(),
            hard_stop.clone(),
        )
        .unwrap();
        let shared = Arc::new(Shared {
            identity,
            policy: policy(metrics.clone()),
            metrics: metrics.clone(),
            limits: Limits {
                connect_timeout: Duration::from_secs(5),
                handshake_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(30),
                drain_timeout: Duration::from_secs(1),
                max_connections,
                underscore_identity_headers: UnderscoreHeaders::Drop,
            },
            draining: hard_stop.clone(),
            hard_stop,
            slots: Arc::new(Semaphore::new(max_connections)),
            audit: auditor,
            upstreams: crate::upstreams::Upstreams::new(&[], metrics.clone()),
        });
        Self {
            ca,
            shared,
            metrics,
            audit_log,
            _dir: dir,
            _hard: hard,
        }
    }

    /// Serves an inbound listener in front of `app` until the returned sender flips.
    pub(crate) async fn inbound(
        &self,
        protocol: Protocol,
        app: SocketAddr,
    ) -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let cfg = Inbound {
            listen: addr,
            app,
            protocol,
            app_protocol: AppProtocol::Http1,
            advertise: None,
        };
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(super::listen::serve_inbound(
            self.shared.clone(),
            cfg,
            l,
            stop_rx,
        ));
        (addr, stop, task)
    }

    /// A connector for a peer holding `creds`, trusting our CA, expecting us.
    pub(crate) fn peer(&self, creds: Arc<Credentials>, alpn: &[&[u8]]) -> TlsConnector {
        peer_of(creds, self.ca.bundles(), alpn)
    }

    /// The handshake failures counted with `reason`.
    pub(crate) fn handshake_failures(&self, reason: &str) -> u64 {
        self.metrics
            .handshake_failures
            .get_or_create(&FailLabels {
                direction: Direction::Inbound,
                reason: reason.into(),
            })
            .get()
    }

    /// The audit records written so far (kind and fields in one object each).
    pub(crate) fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|mut r| {
                if let Some(Value::Object(f)) = r.get("fields").cloned()
                    && let Value::Object(top) = &mut r
                {
                    top.extend(f);
                }
                r
            })
            .collect()
    }

    /// The first audit record of `kind`, waited for a little.
    pub(crate) async fn record(&self, kind: &str) -> Option<Value> {
        for _ in 0..200 {
            if let Some(r) = self.records().into_iter().find(|r| r["kind"] == kind) {
                return Some(r);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

/// A connector for a peer holding `creds` and trusting `bundles`, expecting [`ME`].
pub(crate) fn peer_of(
    creds: Arc<Credentials>,
    bundles: SharedBundles,
    alpn: &[&[u8]],
) -> TlsConnector {
    let expected = IdMatcher::Exact(mayfly_ca::id::parse_id(ME).unwrap());
    TlsConnector::from(Arc::new(
        client_config(creds, bundles, expected, alpn).unwrap(),
    ))
}

/// Dials `addr` and completes the handshake with `peer`.
pub(crate) async fn dial(
    peer: &TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    peer.connect(dial_name(), tcp).await
}

/// An app that echoes every connection's bytes back.
pub(crate) async fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Waits (a bounded while) until `f` holds.
pub(crate) async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}
