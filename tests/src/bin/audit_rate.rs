//! Audit records per second from one sidecar to the control plane's store (issue: audit
//! benchmark), against the store's own ingest rate measured in the same run.
//!
//! A real control plane and one real sidecar run in this process on 127.0.0.1. The harness
//! hands the sidecar's audit stream M records shaped like its HTTP decision records, as fast
//! as the writer takes them (never overflowing its queue, so nothing is dropped), and times:
//! - **spooled**: every record numbered, hash-chained and appended to the spool (the sidecar's
//!   `audit_records_total` counter, read from its admin `/metrics`);
//! - **stored**: every record acknowledged by the control plane (the spool's unacknowledged bytes
//!   back to 0), i.e. shipped over mTLS, chain-checked and committed to SQLite;
//!
//! then checks the stored chain (count and hashes). The baseline is the control plane's ingest
//! alone: the same stored lines fed in process, in the same batch size, to a fresh store.
//!
//! `cargo run --release -p mayfly-tests --bin audit_rate -- [RECORDS]` (default 200000)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mayfly_ca::server;
use mayfly_ca::svid::SvidInfo;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

const ID: &str = "spiffe://mayfly.local/bench/web";

/// One sample of the sidecar's admin metrics: (records spooled, unacknowledged spool bytes).
fn scrape(admin: SocketAddr) -> Result<(u64, u64)> {
    let mut s = TcpStream::connect(admin)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: admin\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let value = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .with_context(|| format!("no {name} in /metrics"))?
            .trim()
            .parse::<f64>()
            .map(|v| v as u64)
            .with_context(|| format!("{name} is not a number"))
    };
    Ok((
        value("mayfly_sidecar_audit_records_total")?,
        value("mayfly_sidecar_audit_spool_bytes")?,
    ))
}

/// Fields like those of an HTTP request decision on the data path.
fn fields(i: u64) -> Map<String, Value> {
    let v = json!({
        "direction": "inbound", "local_id": ID,
        "peer_id": "spiffe://mayfly.local/bench/orders", "peer_addr": "10.1.2.3:51234",
        "peer_serial": "5f0c2a7d9e11b3c4a8d2e6f10b7c9a31", "protocol": "http",
        "method": "GET", "path": format!("/api/orders/{i}"), "decision": "allow",
        "enforced": true, "rule": "orders-read", "decision_id": format!("d-{i:016x}"),
        "status": 200, "duration_ms": 1,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

async fn run(m: u64) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cp = mayfly_tests::in_process_control_plane(tmp.path(), None).await?;
    let (token, _) = cp
        .ca
        .create_token(ID, Duration::from_secs(600), "bench")
        .map_err(anyhow::Error::msg)?;
    let tok = tmp.path().join("web.token");
    std::fs::write(&tok, token.reveal().as_bytes())?;
    let cfg = format!(
        "spiffe_id = \"{ID}\"\n[control_plane]\naddress = \"{}\"\ntoken_file = \"{}\"\n[policy]\nfile = \"{}\"\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:9\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[audit]\nspool_dir = \"{}\"\nmax_spool_bytes = 1073741824\n",
        cp.api_addr,
        tok.display(),
        tmp.path().join("policy.toml").display(),
        tmp.path().join("spool").display()
    );
    std::fs::write(tmp.path().join("policy.toml"), "version = 1\n")?;
    let cfg = mayfly_sidecar::config::Config::parse(&cfg, "bench", tmp.path())?;
    let sc = mayfly_sidecar::start(cfg).await.context("sidecar start")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sc.identity.ready() {
        anyhow::ensure!(Instant::now() < deadline, "no SVID in 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (base, _) = scrape(sc.admin_addr)?;
    let cpu0 = cpu_seconds()?;
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < m {
        // Keep the writer's queue under half full: emit never blocks and would drop instead.
        if sc.audit.queued() > 16 * 1024 {
            tokio::time::sleep(Duration::from_micros(200)).await;
            continue;
        }
        for _ in 0..1024.min(m - sent) {
            sc.audit.emit("http.request", fields(sent));
            sent += 1;
        }
        tokio::task::yield_now().await;
    }
    if sc.audit.dropped() > 0 {
        bail!(
            "{} records dropped: the harness overran the writer",
            sc.audit.dropped()
        );
    }
    let mut spooled_at = None;
    let stored_at;
    loop {
        let (records, unacked) = scrape(sc.admin_addr)?;
        if spooled_at.is_none() && records >= base + m {
            spooled_at = Some(t0.elapsed());
        }
        if spooled_at.is_some() && unacked == 0 {
            stored_at = t0.elapsed();
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(600),
            "records not stored in 600 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = cpu_seconds()? - cpu0;
    let spooled_at = spooled_at.unwrap_or(stored_at);

    // The store holds the whole chain, each record once, hashes intact.
    let store = cp.ca.store().clone();
    let chains = store.audit_chains()?;
    let chain = chains
        .iter()
        .find(|c| c.starts_with(ID))
        .context("the sidecar's chain is not in the store")?
        .clone();
    let lines = store.audit_lines(&chain)?;
    let summary = mayfly_ca::audit::verify_lines(&chain, lines.iter().map(Vec::as_slice), None)?;
    let requests = lines
        .iter()
        .filter(|l| l.windows(14).any(|w| w == b"\"http.request\""))
        .count() as u64;
    anyhow::ensure!(
        requests == m,
        "the store holds {requests} request records, {m} sent"
    );
    sc.shutdown().await;
    cp.shutdown().await;

    // Baseline: the same lines, ingested in process by a fresh control plane.
    let tmp2 = tempfile::tempdir()?;
    let cp2 = mayfly_tests::in_process_control_plane(tmp2.path(), None).await?;
    let now = OffsetDateTime::now_utc();
    let peer = SvidInfo {
        id: mayfly_ca::id::parse_workload_id(ID)?,
        serial: "01".into(),
        not_before: now,
        not_after: now + Duration::from_secs(3600),
    };
    let ca = cp2.ca.clone();
    let t1 = Instant::now();
    tokio::task::block_in_place(|| -> Result<()> {
        for batch in lines.chunks(mayfly_sidecar::audit::SHIP_BATCH) {
            let mut body = Vec::new();
            for l in batch {
                body.extend_from_slice(l);
                body.push(b'\n');
            }
            server::audit::ingest(&ca, Some(&peer), &body)?;
        }
        Ok(())
    })?;
    let ingest = lines.len() as f64 / t1.elapsed().as_secs_f64();
    cp2.shutdown().await;

    let total = lines.len() as f64; // requests + checkpoints
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    println!(
        "audit benchmark: {m} request records ({} with checkpoints, {:.0} bytes each on average)",
        lines.len(),
        bytes as f64 / total
    );
    println!(
        "spooled (numbered, chained, appended):  {:>8.0} records/s",
        total / spooled_at.as_secs_f64()
    );
    println!(
        "stored end to end (mTLS, chain check, SQLite): {:>8.0} records/s ({:.2}x of the store's in-process ingest)",
        total / stored_at.as_secs_f64(),
        total / stored_at.as_secs_f64() / ingest
    );
    println!("store ingest alone, in process:          {ingest:>8.0} records/s");
    println!(
        "CPU (sidecar + control plane, this process): {:.1} us per record; chain verified: {} records, {} checkpoints",
        cpu / total * 1e6,
        summary.records,
        summary.checkpoints
    );
    Ok(())
}

/// This process's CPU time (user + system), in seconds.
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).context("no utime")?.parse::<u64>()?
        + f.get(12).context("no stime")?.parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let m = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("RECORDS must be a number")?
        .unwrap_or(200_000);
    run(m).await
}
