//! SVIDs/s and audit records/s of the control plane's store path with SQLite, with
//! PostgreSQL and one replica, and with two replicas on one PostgreSQL database (issue #19).
//!
//! Each setup runs real control planes in this process (`mayfly_ca::server::start`, as
//! `mayfly-ca run` does; PostgreSQL is a throwaway server started by the test harness) and
//! drives them in process, PostgreSQL with `fsync = on` on the same disk as SQLite, without
//! the network (whose cost is the same for every store and is
//! measured by the `issuance` and `audit_rate` harnesses):
//! - **SVIDs/s**: T threads renewing (`Ca::issue_svid` with an SVID caller: CSR check, sign, the
//!   issued-certificate row and chained `svid.issued` event committed), spread over the
//!   replicas round robin;
//! - **audit records/s**: W writers, each its own chain, shipping batches of B records
//!   (`audit::ingest`: parse, chain check, commit), each batch to the next replica (so a
//!   chain's batches alternate between replicas, as after a failover).
//!
//! `cargo run --release -p mayfly-tests --bin replicas -- [--secs 5] [--threads 4]`

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mayfly_ca::audit::{GENESIS, Record, VERSION, line_hash};
use mayfly_ca::id::parse_workload_id;
use mayfly_ca::keys::SecretKey;
use mayfly_ca::server::{self, Ca, Running, ca::Caller};
use mayfly_ca::svid::SvidInfo;
use mayfly_tests::postgres::Postgres;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

const TD: &str = "mayfly.local";
/// Records per audit batch.
const BATCH: u64 = 500;

fn options(data: &Path, store: server::StoreOptions) -> Result<server::RunOptions> {
    Ok(server::RunOptions {
        data_dir: data.to_path_buf(),
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        settings: server::CaSettings::default(),
        drain: Duration::from_secs(1),
        policy_file: None,
        admin_socket: None,
        admin_group: None,
        store,
        console: None,
    })
}

/// `n` replicas on a new PostgreSQL database, or one on SQLite (`pg` is `None`).
async fn setup(dir: &Path, pg: Option<&Postgres>, n: usize) -> Result<Vec<Running>> {
    let config = mayfly_ca::authority::AuthorityConfig::default();
    let Some(pg) = pg else {
        server::init(&dir.join("ca"), TD, config)?;
        return Ok(vec![
            server::start(options(&dir.join("ca"), Default::default())?).await?,
        ]);
    };
    let url = pg.create_db();
    let store = server::StoreOptions {
        url: Some(url.parse()?),
        kek_file: Some(dir.join("ca.kek")),
    };
    server::init_with(&dir.join("r0"), TD, config, &store)?;
    let mut out = Vec::new();
    for i in 0..n {
        out.push(server::start(options(&dir.join(format!("r{i}")), store.clone())?).await?);
    }
    Ok(out)
}

/// Runs `f(thread, round)` on `threads` threads for `secs`; returns the total of what it
/// returned per second.
fn rate(
    threads: usize,
    secs: Duration,
    f: impl Fn(usize, u64) -> Result<u64> + Sync,
) -> Result<f64> {
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let runs: Vec<_> = (0..threads)
            .map(|t| {
                let (stop, done, f) = (&stop, &done, &f);
                s.spawn(move || -> Result<()> {
                    let mut round = 0;
                    while !stop.load(Ordering::Relaxed) {
                        done.fetch_add(f(t, round)?, Ordering::Relaxed);
                        round += 1;
                    }
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(secs);
        stop.store(true, Ordering::Relaxed);
        for r in runs {
            r.join()
                .map_err(|_| anyhow::anyhow!("a bench thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

fn peer(id: &str) -> Result<SvidInfo> {
    let now = OffsetDateTime::now_utc();
    Ok(SvidInfo {
        id: parse_workload_id(id)?,
        serial: "01".into(),
        not_before: now,
        not_after: now + Duration::from_secs(3600),
    })
}

fn svids(cas: &[Arc<Ca>], threads: usize, secs: Duration) -> Result<f64> {
    // CSRs made before the timed window (a sidecar makes its key on its own machine).
    let mut work = Vec::new();
    for t in 0..threads {
        let id = format!("spiffe://{TD}/bench/svc-{t}");
        let caller = peer(&id)?;
        let mut csrs = Vec::new();
        for _ in 0..8 {
            let key = SecretKey::generate()?;
            csrs.push(mayfly_ca::issue::make_csr(&key, &caller.id)?);
        }
        work.push((caller, csrs));
    }
    rate(threads, secs, |t, round| {
        let (caller, csrs) = &work[t];
        let ca = &cas[(t + round as usize) % cas.len()];
        let csr = &csrs[round as usize % csrs.len()];
        ca.issue_svid(csr, Caller::Svid(caller.clone()), None, "bench")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(1)
    })
}

fn fields(i: u64, source: &str) -> Map<String, Value> {
    match json!({
        "direction": "inbound", "local_id": source,
        "peer_id": "spiffe://mayfly.local/bench/orders", "peer_addr": "10.1.2.3:51234",
        "protocol": "http", "method": "GET", "path": format!("/api/orders/{i}"),
        "decision": "allow", "enforced": true, "rule": "orders-read", "status": 200,
    }) {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn audit(cas: &[Arc<Ca>], writers: usize, secs: Duration) -> Result<f64> {
    let mut epoch = [0u8; 8];
    mayfly_ca::keys::fill_random(&mut epoch);
    let epoch: String = epoch.iter().map(|b| format!("{b:02x}")).collect();
    let chains: Vec<_> = (0..writers)
        .map(|w| {
            let source = format!("spiffe://{TD}/bench/writer-{w}");
            Ok((
                peer(&source)?,
                source,
                std::sync::Mutex::new(GENESIS.to_owned()),
            ))
        })
        .collect::<Result<_>>()?;
    rate(writers, secs, |w, round| {
        let (peer, source, prev) = &chains[w];
        let mut prev = prev.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let mut body = Vec::new();
        for i in 0..BATCH {
            let seq = round * BATCH + i + 1;
            let line = Record {
                v: VERSION,
                source: source.clone(),
                epoch: epoch.clone(),
                seq,
                prev: prev.clone(),
                ts_ms: 1_800_000_000_000 + seq as i64,
                kind: "http.request".into(),
                fields: fields(seq, source),
            }
            .line();
            *prev = line_hash(&line);
            body.extend_from_slice(&line);
            body.push(b'\n');
        }
        let ca = &cas[(w + round as usize) % cas.len()];
        server::audit::ingest(ca, Some(peer), &body).context("ingest")?;
        Ok(BATCH)
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| -> Result<u64> {
        match args.iter().position(|a| a == name) {
            Some(i) => args
                .get(i + 1)
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} is not a number")),
            None => Ok(default),
        }
    };
    let secs = Duration::from_secs(arg("--secs", 5)?);
    let threads = usize::try_from(arg("--threads", 4)?)?;
    // Durable commits, as in production (the test harness runs without fsync).
    let mut pg = Postgres::start();
    pg.stop();
    pg.restart_durable();
    println!(
        "store path, in process, {threads} threads, {}s per figure ({} cores)",
        secs.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| store | SVIDs/s | audit records/s |");
    println!("|---|---|---|");
    for (name, pg, n) in [
        ("SQLite", None, 1),
        ("PostgreSQL, 1 replica", Some(&pg), 1),
        ("PostgreSQL, 2 replicas", Some(&pg), 2),
    ] {
        let tmp = tempfile::tempdir()?;
        let running = setup(tmp.path(), pg, n).await?;
        let cas: Vec<Arc<Ca>> = running.iter().map(|r| r.ca.clone()).collect();
        let (s, a) = tokio::task::block_in_place(|| -> Result<(f64, f64)> {
            Ok((svids(&cas, threads, secs)?, audit(&cas, threads, secs)?))
        })?;
        println!("| {name} | {s:.0} | {a:.0} |");
        for r in running {
            r.shutdown().await;
        }
    }
    Ok(())
}
