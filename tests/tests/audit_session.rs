//! Audit deliveries over a kept-open mTLS connection: records arrive in order over one
//! connection, and a client certificate that expires while the connection stays open stops
//! authenticating on it (nothing more is stored).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use mayfly_ca::audit::{GENESIS, Record, VERSION, line_hash};
use mayfly_ca::bundle::BundleSet;
use mayfly_ca::client::CaClient;
use mayfly_ca::id::{parse_trust_domain, parse_workload_id};
use mayfly_ca::keys::SecretKey;
use mayfly_ca::server::ca::Caller;
use mayfly_ca::svid::SvidInfo;
use mayfly_ca::tls::{Credentials, Svid};
use time::OffsetDateTime;

const ID: &str = "spiffe://mayfly.local/web";

fn record(seq: u64, prev: &str) -> Vec<u8> {
    Record {
        v: VERSION,
        source: ID.into(),
        epoch: "e1".into(),
        seq,
        prev: prev.into(),
        ts_ms: 1,
        kind: "http.request".into(),
        fields: serde_json::Map::new(),
    }
    .line()
}

/// A control plane in this process, and a client holding an SVID from it that lives 3 s:
/// (control plane, client, its credentials, its bundles, the certificate's NotAfter).
async fn control_plane_and_short_lived_client() -> (
    tempfile::TempDir,
    mayfly_ca::server::Running,
    CaClient,
    Arc<Credentials>,
    mayfly_ca::verify::SharedBundles,
    OffsetDateTime,
) {
    let tmp = tempfile::tempdir().unwrap();
    let cp = mayfly_tests::in_process_control_plane(tmp.path(), None)
        .await
        .unwrap();
    let id = parse_workload_id(ID).unwrap();
    let key = SecretKey::generate().unwrap();
    let csr = mayfly_ca::issue::make_csr(&key, &id).unwrap();
    let now = OffsetDateTime::now_utc();
    let caller = SvidInfo {
        id,
        serial: "01".into(),
        not_before: now,
        not_after: now + Duration::from_secs(60),
    };
    let issued = cp
        .ca
        .issue_svid(
            &csr,
            Caller::Svid(caller),
            Some(Duration::from_secs(3)),
            "test",
        )
        .unwrap();
    let creds = Credentials::new();
    creds.set(Svid::new(issued.chain, &key).unwrap());
    // The certificate's NotAfter (X.509 times are whole seconds).
    let not_after = creds.get().unwrap().info.not_after;
    let bundles = Arc::new(ArcSwap::from_pointee(BundleSet::single(
        (*cp.ca.bundle()).clone(),
    )));
    let client = CaClient::new(
        cp.api_addr.to_string(),
        parse_trust_domain("mayfly.local").unwrap(),
    )
    .unwrap();
    (tmp, cp, client, creds, bundles, not_after)
}

#[tokio::test]
async fn a_kept_connection_delivers_and_stops_authenticating_at_certificate_expiry() {
    let (_tmp, cp, client, creds, bundles, not_after) =
        control_plane_and_short_lived_client().await;
    let mut session = client.audit_session(bundles, creds);
    let chain = format!("{ID}#e1");
    let mut prev = GENESIS.to_owned();
    let mut sent = Vec::new();
    for seq in 1..=3 {
        let line = record(seq, &prev);
        prev = line_hash(&line);
        let acked = session
            .post(Bytes::from([line.as_slice(), b"\n"].concat()))
            .await
            .unwrap();
        assert_eq!(acked, seq);
        sent.push(line);
    }
    assert_eq!(cp.ca.store().audit_lines(&chain).unwrap(), sent);

    // Past the certificate's NotAfter, the same open connection authenticates nothing, and a
    // new one cannot be made with it: the record is refused and not stored.
    let wait = (not_after - OffsetDateTime::now_utc()).whole_milliseconds() + 1200;
    tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap_or(0))).await;
    let line = record(4, &prev);
    let refused = session
        .post(Bytes::from([line.as_slice(), b"\n"].concat()))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(cp.ca.store().audit_lines(&chain).unwrap(), sent);
    cp.shutdown().await;
}

/// The policy watch stream, also a long-lived request, ends when the client certificate that
/// opened it expires (the sidecar reconnects with its renewed SVID).
#[tokio::test]
async fn a_watch_stream_ends_at_the_client_certificate_expiry() {
    let (_tmp, cp, client, creds, bundles, not_after) =
        control_plane_and_short_lived_client().await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let watch = tokio::spawn(async move { client.watch(bundles, creds, tx).await });
    assert!(rx.recv().await.is_some(), "a first snapshot at once");
    // Ends within a second or so of NotAfter, long before the 15 s heartbeat would matter.
    let ended = tokio::time::timeout(Duration::from_secs(8), watch).await;
    let ended_at = OffsetDateTime::now_utc();
    assert!(
        ended.is_ok(),
        "the watch stream outlived the client certificate"
    );
    assert!(
        ended_at >= not_after,
        "ended {} ms before NotAfter: {ended:?}",
        (not_after - ended_at).whole_milliseconds()
    );
    cp.shutdown().await;
}
