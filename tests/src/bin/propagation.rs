//! Measures how long an approved grant takes to reach N sidecars (issue: "active grants reach
//! every sidecar within one second"). Runs a real control plane and N real sidecars in one
//! process on 127.0.0.1 (each with its own listeners, SVID and watch stream), approves a
//! grant, and records when each sidecar's engine holds it.
//!
//! `cargo run --release -p mayfly-tests --bin propagation -- 10 50 100`

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mayfly_ca::server;

const POLICY: &str = "version = 1\n[grants]\nmax_ttl = \"10m\"\napprovals = 0\n";

async fn run(n: usize) -> Result<Vec<Duration>> {
    let tmp = tempfile::tempdir()?;
    let policy = tmp.path().join("policy.toml");
    std::fs::write(&policy, POLICY)?;
    let cp = mayfly_tests::in_process_control_plane(tmp.path(), Some(policy)).await?;
    let mut sidecars = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("spiffe://mayfly.local/svc-{i}");
        let (token, _) = cp
            .ca
            .create_token(&id, Duration::from_secs(600), "bench")
            .map_err(anyhow::Error::msg)?;
        let tok = tmp.path().join(format!("svc-{i}.token"));
        std::fs::write(&tok, token.reveal().as_bytes())?;
        let cfg = format!(
            "spiffe_id = \"{id}\"\n[control_plane]\naddress = \"{}\"\ntoken_file = \"{}\"\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:9\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[audit]\nspool_dir = \"{}\"\n",
            cp.api_addr,
            tok.display(),
            tmp.path().join(format!("audit-{i}")).display()
        );
        let cfg = mayfly_sidecar::config::Config::parse(&cfg, "bench", tmp.path())?;
        sidecars.push(mayfly_sidecar::start(cfg).await.context("sidecar start")?);
    }
    // Every sidecar holds an SVID and the pushed policy.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !sidecars
        .iter()
        .all(|s| s.identity.ready() && s.policy.loaded())
    {
        anyhow::ensure!(Instant::now() < deadline, "sidecars not ready in 120 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    let g = server::distribution::request(
        &cp.ca,
        &cp.ca.dist,
        "bench",
        server::distribution::GrantRequest {
            from: "spiffe://mayfly.local/client".into(),
            to: "spiffe://mayfly.local/svc-0".into(),
            methods: vec![],
            paths: vec![],
            ttl: "5m".into(),
            reason: "propagation benchmark".into(),
        },
    )
    .map_err(anyhow::Error::msg)?;
    let mut seen: Vec<Option<Duration>> = vec![None; n];
    while seen.iter().any(Option::is_none) {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "grant did not reach every sidecar in 30 s"
        );
        for (i, s) in sidecars.iter().enumerate() {
            if seen[i].is_none() && s.policy.has_grant(&g.id) {
                seen[i] = Some(t0.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let mut times: Vec<Duration> = seen.into_iter().flatten().collect();
    times.sort();
    for s in sidecars {
        s.shutdown().await;
    }
    cp.shutdown().await;
    Ok(times)
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    let ns: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ns = if ns.is_empty() { vec![10, 50, 100] } else { ns };
    println!(
        "{:>5} {:>10} {:>10} {:>10}",
        "N", "p50 ms", "p99 ms", "max ms"
    );
    for n in ns {
        let t = run(n).await?;
        println!(
            "{:>5} {:>10.2} {:>10.2} {:>10.2}",
            n,
            pct(&t, 0.5).as_secs_f64() * 1e3,
            pct(&t, 0.99).as_secs_f64() * 1e3,
            t.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
