//! Sustained SVID issuance over the network path, against the in-process signing rate measured in
//! the same run (issue: control plane benchmark).
//!
//! Three figures, on the same machine, one after the other:
//! 1. **sign**: the identity core alone (CSR verify + sign with the active intermediate) on as many
//!    threads as there are cores, no store, no network: the ceiling.
//! 2. **sign + store**: the control plane's `issue_svid` in process (the same code `POST /v1/svid`
//!    runs), which also writes the issued-certificate log and the chained `svid.issued` event to
//!    SQLite (WAL, `synchronous = FULL`).
//! 3. **network**: a real control plane in a child process (this binary with `--serve`, which runs
//!    `mayfly_ca::server::start` exactly as `mayfly-ca run` does) and C concurrent clients in this
//!    process, each bootstrapped with its own join token, then renewing over mutual TLS in a loop
//!    with `CaClient::renew` (new TCP + TLS 1.3 connection, CSR, chain back) as sidecars do.
//!    The control plane's CPU time per issued SVID comes from /proc, so the per-core capacity of
//!    the server can be read apart from the clients sharing the machine.
//!
//! Client keys come from a pool made before the timed window (a sidecar makes one key per
//! rotation on its own machine; here that CPU would be taken from the server under test).
//!
//! `cargo run --release -p mayfly-tests --bin issuance -- [--secs 10] [C ...]` (default C: 1 8 32)

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use mayfly_ca::bundle::BundleSet;
use mayfly_ca::client::CaClient;
use mayfly_ca::id::{SpiffeId, parse_trust_domain, parse_workload_id};
use mayfly_ca::keys::SecretKey;
use mayfly_ca::server::ca::Caller;
use mayfly_ca::svid::SvidInfo;
use mayfly_ca::tls::{Credentials, Svid};
use mayfly_ca::token::JoinToken;
use time::OffsetDateTime;

const TD: &str = "mayfly.local";

fn id_of(i: usize) -> String {
    format!("spiffe://{TD}/bench/client-{i}")
}

/// Child process: a control plane with `n` join tokens; prints its address and the tokens, serves
/// until stdin closes, then prints how many SVIDs its store logged.
async fn serve(dir: &Path, n: usize) -> Result<()> {
    let cp = mayfly_tests::in_process_control_plane(dir, None).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ADDR {}", cp.api_addr)?;
    for i in 0..n {
        let (token, _) = cp
            .ca
            .create_token(&id_of(i), Duration::from_secs(600), "bench")
            .map_err(anyhow::Error::msg)?;
        writeln!(out, "TOKEN {}", token.reveal().as_str())?;
    }
    writeln!(out, "READY")?;
    out.flush()?;
    drop(out);
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            sink.clear();
        }
    })
    .await?;
    let logged = cp
        .ca
        .store()
        .list_issued(u32::MAX)
        .map_err(anyhow::Error::msg)?
        .len();
    println!("ISSUED {logged}");
    cp.shutdown().await;
    Ok(())
}

/// Runs `f` on `threads` OS threads for `secs`; returns operations per second.
fn rate(threads: usize, secs: Duration, f: impl Fn() -> Result<()> + Sync) -> Result<f64> {
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    while !stop.load(Ordering::Relaxed) {
                        f()?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(secs);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        }
        Ok(())
    })?;
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

/// Figures 1 and 2.
async fn in_process(threads: usize, secs: Duration) -> Result<(f64, f64)> {
    let tmp = tempfile::tempdir()?;
    let cp = mayfly_tests::in_process_control_plane(tmp.path(), None).await?;
    let id = parse_workload_id(&id_of(0))?;
    let key = SecretKey::generate()?;
    let csr = mayfly_ca::issue::make_csr(&key, &id)?;
    let authorities = cp.ca.authorities().map_err(anyhow::Error::msg)?;
    let signer = authorities.signer().context("no active intermediate")?;
    let sign = rate(threads, secs, || {
        let v = mayfly_ca::issue::verify_csr(&csr)?;
        mayfly_ca::issue::issue(
            signer,
            &v,
            &id,
            Duration::from_secs(300),
            OffsetDateTime::now_utc(),
        )?;
        Ok(())
    })?;
    let now = OffsetDateTime::now_utc();
    let caller = SvidInfo {
        id: id.clone(),
        serial: "01".into(),
        not_before: now,
        not_after: now + Duration::from_secs(3600),
    };
    let ca = cp.ca.clone();
    let stored = tokio::task::block_in_place(|| {
        rate(threads, secs, || {
            ca.issue_svid(&csr, Caller::Svid(caller.clone()), None, "bench")
                .map_err(anyhow::Error::msg)?;
            Ok(())
        })
    })?;
    cp.shutdown().await;
    Ok((sign, stored))
}

/// One client of figure 3: its ID, its current SVID and the bundles it trusts.
struct Client {
    id: SpiffeId,
    creds: Arc<Credentials>,
    bundles: mayfly_ca::verify::SharedBundles,
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the ")" that ends the command name: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

struct Round {
    rate: f64,
    p50: Duration,
    p99: Duration,
    server_cpu_per_svid: Duration,
    errors: u64,
}

async fn network_round(
    client: &CaClient,
    clients: &[Arc<Client>],
    keys: &Arc<Vec<SecretKey>>,
    secs: Duration,
    server_pid: u32,
) -> Result<Round> {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_ticks(server_pid)?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (n, c) in clients.iter().enumerate() {
        let (c, client, keys, stop, errors) = (
            c.clone(),
            client.clone(),
            keys.clone(),
            stop.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = n;
            while !stop.load(Ordering::Relaxed) {
                k = (k + 1) % keys.len();
                let key = &keys[k];
                let t = Instant::now();
                match client
                    .renew(c.bundles.clone(), c.creds.clone(), key, &c.id, None)
                    .await
                {
                    Ok(issued) => {
                        lat.push(t.elapsed());
                        if let Ok(svid) = Svid::new(issued.chain, key) {
                            c.creds.set(svid);
                        }
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("renewal failed: {e}");
                        }
                    }
                }
            }
            lat
        }));
    }
    tokio::time::sleep(secs).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    let elapsed = t0.elapsed();
    let cpu = (cpu_ticks(server_pid)? - cpu0) as f64 / clock_ticks();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let ok = lat.len().max(1);
    Ok(Round {
        rate: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.5),
        p99: pct(0.99),
        server_cpu_per_svid: Duration::from_secs_f64(cpu / ok as f64),
        errors: errors.load(Ordering::Relaxed),
    })
}

async fn bench(secs: Duration, levels: Vec<usize>) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "issuance benchmark: {cores} cores, {} s per figure",
        secs.as_secs()
    );
    let (sign, stored) = in_process(cores, secs).await?;
    println!("1. sign (identity core, {cores} threads): {sign:>8.0} SVIDs/s");
    println!(
        "2. sign + store (issue_svid, SQLite FULL): {stored:>8.0} SVIDs/s ({:.2}x of 1)",
        stored / sign
    );

    let max = levels.iter().copied().max().unwrap_or(1);
    let tmp = tempfile::tempdir()?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--serve")
        .arg(tmp.path())
        .arg(max.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the control plane child")?;
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().context("no child stdout")?).lines();
    let mut addr = String::new();
    let mut tokens = Vec::new();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(a) = line.strip_prefix("ADDR ") {
            addr = a.to_owned();
        } else if let Some(t) = line.strip_prefix("TOKEN ") {
            tokens.push(JoinToken::parse(t)?);
        } else if line == "READY" {
            break;
        }
    }
    if addr.is_empty() || tokens.len() != max {
        bail!("the control plane child did not start");
    }
    let client = CaClient::new(addr, parse_trust_domain(TD)?)?;
    let mut clients = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let id = parse_workload_id(&id_of(i))?;
        let key = SecretKey::generate()?;
        let issued = client.bootstrap(token, &key, &id, None).await?;
        let creds = Credentials::new();
        creds.set(Svid::new(issued.chain, &key)?);
        clients.push(Arc::new(Client {
            id,
            creds,
            bundles: Arc::new(ArcSwap::from_pointee(BundleSet::single(issued.bundle))),
        }));
    }
    let keys = Arc::new(
        (0..256)
            .map(|_| SecretKey::generate())
            .collect::<Result<Vec<_>, _>>()?,
    );
    let mut total = max as u64; // the bootstraps
    for c in levels {
        let r = network_round(&client, &clients[..c], &keys, secs, pid).await?;
        total += (r.rate * secs.as_secs_f64()).round() as u64;
        println!(
            "3. network, {c:>3} clients: {:>8.0} SVIDs/s ({:.2}x of 1, {:.2}x of 2), p50 {:.2} ms, p99 {:.2} ms, server CPU {:.0} us/SVID (= {:.0} SVIDs/s per core), {} errors",
            r.rate,
            r.rate / sign,
            r.rate / stored,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.server_cpu_per_svid.as_secs_f64() * 1e6,
            1.0 / r.server_cpu_per_svid.as_secs_f64().max(1e-9),
            r.errors
        );
    }
    drop(child.stdin.take());
    for line in lines {
        if let Some(n) = line?.strip_prefix("ISSUED ") {
            println!(
                "store: {n} SVIDs logged by the control plane (about {total} expected, + its own)"
            );
        }
    }
    child.wait()?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.first().map(String::as_str) == Some("--serve") {
        let dir = args.get(1).context("--serve DIR N")?;
        let n = args.get(2).context("--serve DIR N")?.parse()?;
        return rt.block_on(serve(Path::new(dir), n));
    }
    let mut secs = Duration::from_secs(10);
    let mut levels = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--secs" {
            secs = Duration::from_secs(it.next().context("--secs N")?.parse()?);
        } else {
            levels.push(
                a.parse()
                    .with_context(|| format!("not a client count: {a}"))?,
            );
        }
    }
    if levels.is_empty() {
        levels = vec![1, 8, 32];
    }
    rt.block_on(bench(secs, levels))
}
