//! L4 proxying: a verified inbound connection spliced to the app, and connections from the app
//! originated over mTLS to the remote sidecar; a policy decision per connection, and no
//! connection outliving the peer's SVID or the policy that admitted it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use mayfly_ca::svid::SvidInfo;
use mayfly_ca::tls::{client_config, dial_name};
use mayfly_ca::verify::{IdMatcher, describe_tls_error, peer_identity};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use super::{OpenGuard, Shared, audit_base_fields, handshake, instant_at};
use crate::audit::{Field, FieldList};
use crate::config::{Inbound, Outbound};
use crate::metrics::{DirLabels, Direction, EndLabels, Metrics};
use crate::policy::Verdict;
use crate::splice::{End, Halves, Outcome, splice};
use crate::upstreams::{Pool, Target};

/// The fields of a connection's records (`connection.open`, `connection.denied`; the close
/// adds what it did). Kept for the connection's life: a list of static keys and shared strings,
/// not a map of owned ones.
fn conn_fields(
    direction: Direction,
    local: &str,
    peer: &str,
    peer_addr: Option<&str>,
    peer_serial: Option<&str>,
    verdict: &Verdict,
    port: Option<u16>,
) -> FieldList {
    let mut fields = audit_base_fields(direction, local, peer, peer_addr, peer_serial, "tcp");
    verdict.audit_fields(&mut fields);
    if let Some(p) = port {
        fields.insert("port", Field::U64(p.into()));
    }
    fields
}

/// Adds what a finished connection did.
fn audit_close(
    mut m: FieldList,
    out: &Outcome,
    direction: Direction,
    started: std::time::Instant,
) -> FieldList {
    let (to_app, from_app) = match direction {
        Direction::Inbound => (out.a_to_b, out.b_to_a),
        Direction::Outbound => (out.b_to_a, out.a_to_b),
    };
    m.insert("bytes_to_app", Field::U64(to_app));
    m.insert("bytes_from_app", Field::U64(from_app));
    m.insert(
        "duration_ms",
        Field::U64(started.elapsed().as_millis() as u64),
    );
    m.insert("end", Field::Static(out.end.reason()));
    if let End::Revoked(why) = &out.end {
        m.insert("end_detail", Field::Owned(why.clone()));
    }
    m
}

/// Resolves when the connection must end for a reason other than its own traffic: the policy
/// now denies it, or the sidecar's drain deadline passed.
async fn stop_signal(
    shared: Arc<Shared>,
    source: String,
    destination: String,
    port: Option<u16>,
    ip: Option<std::net::IpAddr>,
) -> End {
    let mut generation = shared.policy.watch();
    let mut hard = shared.hard_stop.clone();
    loop {
        tokio::select! {
            r = generation.changed() => {
                if r.is_err() {
                    return std::future::pending().await;
                }
                let v = shared.policy.decide_l4(&source, &destination, port, ip);
                if !v.permits() {
                    return End::Revoked(format!("{} ({})", v.by(), v.decision_id()));
                }
            }
            r = hard.changed() => {
                if r.is_err() || *hard.borrow() {
                    return End::Shutdown;
                }
            }
        }
    }
}

/// How a connection ended, in the metrics and in its `connection.close` record.
fn record_close(
    shared: &Shared,
    direction: Direction,
    fields: FieldList,
    out: &Outcome,
    started: std::time::Instant,
) {
    record_end(&shared.metrics, direction, out, started);
    shared.audit.emit(
        "connection.close",
        audit_close(fields, out, direction, started),
    );
}

fn record_end(m: &Metrics, direction: Direction, out: &Outcome, started: std::time::Instant) {
    let d = DirLabels { direction };
    // For inbound, a->b is network->app; for outbound, a is the app.
    let (to_app, from_app) = match direction {
        Direction::Inbound => (out.a_to_b, out.b_to_a),
        Direction::Outbound => (out.b_to_a, out.a_to_b),
    };
    m.bytes_in.get_or_create(&d).inc_by(to_app);
    m.bytes_out.get_or_create(&d).inc_by(from_app);
    m.ended
        .get_or_create(&EndLabels {
            direction,
            reason: out.end.reason().into(),
        })
        .inc();
    let level_info = matches!(out.end, End::PeerSvidExpired | End::Revoked(_));
    // The reason as the metric spells it, and the detail as text (no Rust Debug syntax).
    let (end, detail) = match &out.end {
        End::Revoked(s) | End::Error(s) => (out.end.reason(), s.as_str()),
        e => (e.reason(), ""),
    };
    if level_info {
        info!(
            end,
            detail,
            to_app,
            from_app,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed"
        );
    } else {
        debug!(
            end,
            detail,
            to_app,
            from_app,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed"
        );
    }
}

/// Proxies one verified inbound connection to the app, if the policy lets the peer in.
///
/// The TLS stream goes into its halves before the connection's future exists: that future
/// lives as long as the connection and would otherwise keep a second place for the stream.
pub fn inbound_conn(
    shared: Arc<Shared>,
    cfg: Inbound,
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SvidInfo,
    addr: SocketAddr,
) -> impl Future<Output = ()> {
    inbound_halves(shared, cfg, tokio::io::split(tls), peer, addr)
}

async fn inbound_halves(
    shared: Arc<Shared>,
    cfg: Inbound,
    tls: Halves<tokio_rustls::server::TlsStream<TcpStream>>,
    peer: SvidInfo,
    addr: SocketAddr,
) {
    let started = std::time::Instant::now();
    let m = shared.metrics.clone();
    let source = peer.id.to_string();
    let destination = shared.identity.id.to_string();
    let port = Some(cfg.app.port());
    let ip = Some(addr.ip());
    if !shared.audit.admits() {
        m.decision(Direction::Inbound, "audit_full");
        warn!("audit spool full (fail-closed): refusing the connection");
        return;
    }
    let verdict = shared.policy.decide_l4(&source, &destination, port, ip);
    m.decision(Direction::Inbound, verdict.label());
    let fields = conn_fields(
        Direction::Inbound,
        &destination,
        &source,
        Some(&addr.to_string()),
        Some(&peer.serial),
        &verdict,
        port,
    );
    if !verdict.permits() {
        return record_denial(&shared, Direction::Inbound, &verdict, fields).await;
    }
    if let Verdict::Decided(d) = &verdict
        && !d.allow
    {
        info!(decision = %d.decision_id, "dry-run: connection would be denied; letting it pass");
    }
    let Some(app) = connect(&shared, cfg.app, "the local app").await else {
        m.decision(Direction::Inbound, "app_unreachable");
        return;
    };
    let _open = OpenGuard::new(m.clone(), Direction::Inbound);
    debug!(
        decision = verdict.decision_id(),
        "inbound connection admitted"
    );
    // Strict audit: no byte is forwarded before the decision is on disk.
    if let Err(e) = shared.audit.record("connection.open", fields.clone()).await {
        m.decision(Direction::Inbound, "audit_unavailable");
        warn!(error = %e, "strict audit: the decision record is not durable; closing the connection");
        return;
    }
    let stop = stop_signal(shared.clone(), source, destination, port, ip);
    let out = splice(
        tls,
        tokio::io::split(app),
        shared.limits.idle_timeout,
        instant_at(peer.not_after),
        stop,
    )
    .await;
    record_close(&shared, Direction::Inbound, fields, &out, started);
}

/// One TCP upstream: connections from the app to its local port leave over mTLS to the
/// remote sidecar, which must present the configured SPIFFE ID.
#[derive(Clone)]
pub struct Upstream {
    shared: Arc<Shared>,
    up: Arc<Outbound>,
    pool: Arc<Pool>,
    connector: TlsConnector,
}

impl Upstream {
    /// The upstream's TLS client configuration, from our identity.
    pub fn new(shared: Arc<Shared>, up: Outbound) -> Result<Self, mayfly_ca::tls::TlsError> {
        let tls = client_config(
            shared.identity.creds.clone(),
            shared.identity.bundles.clone(),
            IdMatcher::Exact(up.spiffe_id.clone()),
            &[],
        )?;
        let pool = shared.upstreams.pool_for(&up);
        Ok(Self {
            shared,
            up: Arc::new(up),
            pool,
            connector: TlsConnector::from(Arc::new(tls)),
        })
    }

    /// Proxies one connection from the app, if the egress policy lets it out.
    pub async fn serve_conn(self, app: TcpStream) {
        outbound_conn(self, app).await
    }
}

/// Connects to an endpoint of the upstream and completes the mTLS handshake. A connect or
/// handshake failure ejects the endpoint and, nothing having been sent yet, the next attempt
/// goes to another one (within the retry budget). `None` once the failure is logged and
/// counted.
async fn dial_some(
    shared: &Shared,
    up: &Upstream,
    connector: &TlsConnector,
) -> Option<(Target, tokio_rustls::client::TlsStream<TcpStream>, SvidInfo)> {
    let m = &shared.metrics;
    let pool = &up.pool;
    pool.deposit();
    let mut tried = Vec::new();
    loop {
        let Some(target) = pool.target(&tried) else {
            m.decision(Direction::Outbound, "no_endpoint");
            warn!(spiffe_id = %up.up.spiffe_id, "no live endpoint is registered under the outbound's SPIFFE ID: closing the app's connection");
            return None;
        };
        let started = std::time::Instant::now();
        match dial_one(shared, connector, target.address()).await {
            Ok((tls, server)) => {
                pool.connected(target.endpoint(), started.elapsed());
                return Some((target, tls, server));
            }
            Err(why) => {
                pool.failed(target.endpoint(), &why);
                tried.push(target.endpoint().clone());
                if !pool.may_retry(tried.len()) {
                    m.decision(Direction::Outbound, "remote_unreachable");
                    return None;
                }
            }
        }
    }
}

/// One connect and handshake to `addr`; the failure's description (counted, not logged).
async fn dial_one(
    shared: &Shared,
    connector: &TlsConnector,
    addr: &str,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, SvidInfo), String> {
    let m = &shared.metrics;
    let tcp =
        match tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("cannot connect: {e}")),
            Err(_) => return Err("timed out connecting".into()),
        };
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(
        shared.limits.handshake_timeout,
        connector.connect(dial_name(), tcp),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            m.handshake_failed(Direction::Outbound, handshake::failure_reason(&e));
            return Err(format!("TLS handshake refused: {}", describe_tls_error(&e)));
        }
        Err(_) => {
            m.handshake_failed(Direction::Outbound, "timeout");
            return Err("TLS handshake timed out".into());
        }
    };
    match peer_identity(tls.get_ref().1.peer_certificates()) {
        Ok(p) => Ok((tls, p)),
        Err(e) => {
            m.handshake_failed(Direction::Outbound, e.reason());
            Err(format!("TLS handshake refused: {e}"))
        }
    }
}

async fn outbound_conn(up: Upstream, app: TcpStream) {
    let shared = up.shared.clone();
    let connector = up.connector.clone();
    let started = std::time::Instant::now();
    let m = shared.metrics.clone();
    let source = shared.identity.id.to_string();
    let destination = up.up.spiffe_id.to_string();
    // Egress policy first: nothing leaves that the policy would not let in.
    if !shared.audit.admits() {
        m.decision(Direction::Outbound, "audit_full");
        warn!("audit spool full (fail-closed): refusing the connection");
        return;
    }
    let verdict = shared
        .policy
        .decide_l4(&source, &destination, up.up.port, None);
    m.decision(Direction::Outbound, verdict.label());
    let mut fields = conn_fields(
        Direction::Outbound,
        &source,
        &destination,
        None,
        None,
        &verdict,
        up.up.port,
    );
    if !verdict.permits() {
        return record_denial(&shared, Direction::Outbound, &verdict, fields).await;
    }
    // Held until the connection ends: it counts as outstanding on its endpoint.
    // Boxed, and the stream split at once: the connect and handshake states are freed once
    // done, and the connection's future holds the stream once, behind its halves.
    let dialled = Box::pin(dial_some(&shared, &up, &connector)).await;
    let Some((target, tls, server, kx)) = dialled.map(|(target, tls, server)| {
        let kx = mayfly_ca::tls::negotiated_group(tls.get_ref().1);
        (target, tokio::io::split(tls), server, kx)
    }) else {
        return;
    };
    m.handshake(Direction::Outbound, kx);
    tracing::Span::current().record("kx", tracing::field::display(kx));
    let _open = OpenGuard::new(m.clone(), Direction::Outbound);
    fields.insert("peer_addr", Field::Owned(target.address().to_owned()));
    fields.insert("peer_serial", Field::Owned(server.serial.clone()));
    // Strict audit: no byte is forwarded before the decision is on disk.
    if let Err(e) = shared.audit.record("connection.open", fields.clone()).await {
        m.decision(Direction::Outbound, "audit_unavailable");
        warn!(error = %e, "strict audit: the decision record is not durable; closing the connection");
        return;
    }
    let stop = stop_signal(shared.clone(), source, destination, up.up.port, None);
    let out = splice(
        tokio::io::split(app),
        tls,
        shared.limits.idle_timeout,
        instant_at(server.not_after),
        stop,
    )
    .await;
    record_close(&shared, Direction::Outbound, fields, &out, started);
}
/// Logs a connection the policy denies and records its `connection.denied` record; under strict
/// audit the connection is closed only once that record is on disk.
async fn record_denial(
    shared: &Shared,
    direction: Direction,
    verdict: &Verdict,
    fields: FieldList,
) {
    info!(decision = verdict.decision_id(), by = %verdict.by(), "{} connection denied by policy", direction.as_str());
    if let Err(e) = shared.audit.record("connection.denied", fields).await {
        warn!(error = %e, "strict audit: the denial's record is not durable");
    }
}

/// Connects to `addr` (`what` names it in the log) within the connect timeout, with Nagle's
/// algorithm off; `None` once the failure is logged.
async fn connect<A>(shared: &Shared, addr: A, what: &str) -> Option<TcpStream>
where
    A: tokio::net::ToSocketAddrs + std::fmt::Display + Copy,
{
    match tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        Ok(Err(e)) => {
            warn!(%addr, error = %e, "cannot connect to {what}");
            None
        }
        Err(_) => {
            warn!(%addr, "timed out connecting to {what}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use mayfly_policy::{DecidedBy, Decision};

    use super::*;
    use crate::audit::{Fields, line};
    use crate::conn::audit_base;

    fn line_of(kind: &str, f: Fields) -> String {
        String::from_utf8(line("spiffe://t/a", "e1", 7, "00", 1, kind, &f)).unwrap()
    }

    /// The L4 records, now built as a list of static keys, are the bytes they were as a
    /// `serde_json::Map` (the chain's hashes depend on every byte).
    #[test]
    fn l4_records_are_the_bytes_they_were_as_a_map() {
        let verdicts = [
            Verdict::NoPolicy,
            Verdict::Decided(Decision {
                allow: true,
                enforced: true,
                decided_by: DecidedBy::Rule(Arc::from("web-to-db")),
                dry_run: None,
                policy_version: Arc::from("sha256:1f2e"),
                decision_id: "d-1".into(),
            }),
        ];
        let ends = [End::Done, End::Revoked("rule r (d-2)".into())];
        for (verdict, end) in verdicts.iter().zip(ends) {
            let mut list = conn_fields(
                Direction::Outbound,
                "spiffe://t/a",
                "spiffe://t/b",
                None,
                None,
                verdict,
                Some(5432),
            );
            list.insert("peer_addr", Field::Owned("127.0.0.1:9".into()));
            list.insert("peer_serial", Field::Owned("3f9a".into()));
            let mut map = audit_base(
                Direction::Outbound,
                "spiffe://t/a",
                "spiffe://t/b",
                None,
                None,
                "tcp",
            );
            verdict.audit_into(&mut map);
            map.insert("port".into(), 5432.into());
            map.insert("peer_addr".into(), "127.0.0.1:9".into());
            map.insert("peer_serial".into(), "3f9a".into());
            assert_eq!(
                line_of("connection.open", Fields::List(list.clone())),
                line_of("connection.open", Fields::Map(map.clone()))
            );
            let out = Outcome {
                a_to_b: 11,
                b_to_a: 22,
                end: end.clone(),
            };
            let list = audit_close(list, &out, Direction::Outbound, std::time::Instant::now());
            let Some(Field::U64(ms)) = list.get("duration_ms").cloned() else {
                panic!("no duration_ms in {list:?}");
            };
            map.insert("bytes_to_app".into(), 22.into());
            map.insert("bytes_from_app".into(), 11.into());
            map.insert("duration_ms".into(), ms.into());
            map.insert("end".into(), end.reason().into());
            if let End::Revoked(why) = &end {
                map.insert("end_detail".into(), why.clone().into());
            }
            assert_eq!(
                line_of("connection.close", Fields::List(list)),
                line_of("connection.close", Fields::Map(map))
            );
        }
    }
}
