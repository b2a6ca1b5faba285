//! Step 5: orders as two replicas under one SPIFFE ID: web's requests spread over both, then
//! one is killed with -9 under traffic and no request fails.

use std::collections::BTreeMap;
use std::time::Duration;

use mayfly_examples::{orders, web};
use serde_json::json;

use crate::mesh::{Mesh, SidecarSpec, tail};
use crate::report::{Outcome, Report};
use crate::ui::Ui;

use super::setup::wait_ready;
use super::{Mode, Services, orders_endpoints, wait_endpoints};

/// Requests shown spread over the two replicas.
const SPREAD: usize = 20;
/// Requests per client while a replica is killed.
const UNDER_KILL: usize = 40;
/// Concurrent clients while a replica is killed (HTTP mode; TCP mode: one, see below).
const CLIENTS: usize = 3;

/// One `GET /orders` through web's sidecar: the replica that answered, or why it failed.
async fn get(s: &Services) -> Result<String, String> {
    match web::call(s.web_to_orders(), "GET", "/orders", &[], None).await {
        Ok(r) if r.status == 200 => Ok(r.header(orders::SERVED_BY).unwrap_or("?").to_owned()),
        Ok(r) => Err(format!("HTTP {}: {}", r.status, r.body.trim())),
        Err(e) => Err(format!("{e:#}")),
    }
}

fn counts(served: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in served {
        *m.entry(r.clone()).or_insert(0) += 1;
    }
    m
}

fn shown(m: &BTreeMap<String, usize>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Step 5.
pub(crate) async fn replicas(ui: &mut Ui, mesh: &mut Mesh, s: &Services, report: &mut Report) {
    ui.step("orders as two replicas: spread, then kill -9 one under traffic");
    ui.say(
        "web's outbound to orders names no address, only orders' SPIFFE ID. Each orders \
         sidecar registers its inbound endpoint with the control plane over its own mTLS \
         session (filed under the ID in its certificate), and the control plane pushes the \
         live endpoints to web's sidecar, which picks one per request: the less loaded of two \
         drawn at random.",
    );
    let (detail, outcome, observed) = match run(ui, mesh, s).await {
        Ok(r) => r,
        Err(e) => {
            ui.say(&format!("FAILED: {e:#}"));
            (
                json!({ "error": format!("{e:#}") }),
                Outcome::Failed,
                format!("failed: {e:#}"),
            )
        }
    };
    report.push(
        "orders_replicas",
        "orders: 2 replicas, one killed",
        "spread, 0 failed",
        observed,
        outcome,
        detail,
    );
}

async fn run(
    ui: &mut Ui,
    mesh: &mut Mesh,
    s: &Services,
) -> anyhow::Result<(serde_json::Value, Outcome, String)> {
    // A second replica: its own app and sidecar, the same identity.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app = l.local_addr()?.to_string();
    let db_in = s.db.inbound.clone().unwrap_or_default();
    let ttl = format!("{}s", s.svid_ttl_secs());
    let sc = mesh
        .start_sidecar(&SidecarSpec {
            name: "orders-2",
            workload: "orders",
            inbound: Some((&app, s.mode.as_str())),
            outbound: vec![("db", &db_in, "db", "tcp")],
            svid_ttl: &ttl,
        })
        .await?;
    let db_out = sc.outbound.get("db").cloned().unwrap_or_default();
    let task = tokio::spawn(async move {
        let _ = orders::serve_as(l, db_out, "orders-2").await;
    });
    // Stops the app whatever happens below.
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let app_task = Abort(task);
    wait_ready(mesh, "orders-2", &sc.admin, &s.policy_version).await?;
    wait_endpoints(mesh, &s.web.admin, 2).await?;
    ui.command(&format!(
        "curl http://{}/upstreams   # web's sidecar",
        s.web.admin
    ));
    for (addr, state) in orders_endpoints(&s.web.admin).await {
        ui.item("orders endpoint ", &format!("{addr} ({state})"));
    }

    let mut served = Vec::new();
    let mut failed = Vec::new();
    for _ in 0..SPREAD {
        match get(s).await {
            Ok(r) => served.push(r),
            Err(e) => failed.push(e),
        }
    }
    let spread = counts(&served);
    ui.command(&format!(
        "for i in $(seq {SPREAD}); do curl -s -o /dev/null -w '%header{{{}}}\\n' http://{}/orders; done | sort | uniq -c",
        orders::SERVED_BY,
        s.web_to_orders()
    ));
    ui.say(&format!(
        "{SPREAD} requests, answered by {} ({} failed).",
        shown(&spread),
        failed.len()
    ));
    let spread_ok = failed.is_empty() && spread.len() == 2;

    // Kill -9 replica 2 (sidecar and app) while clients keep sending. In HTTP mode several
    // clients run concurrently and the kill lands mid-traffic: a request that never reached
    // an app is retried on the other replica, an idempotent GET also when it was in flight.
    // In TCP mode the sidecar cannot replay bytes of a connection that was cut, so one
    // client runs and the kill lands between two of its connections: the next one finds the
    // dead endpoint refusing, and goes to the other.
    let clients = if s.mode == Mode::Http { CLIENTS } else { 1 };
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let (killed_tx, killed_rx) = tokio::sync::watch::channel(false);
    let mut kill_tx = Some(kill_tx);
    let mut handles = Vec::new();
    for c in 0..clients {
        let target = s.web_to_orders().to_owned();
        let mut signal = if c == 0 { kill_tx.take() } else { None };
        let mut killed = killed_rx.clone();
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..UNDER_KILL {
                if i == UNDER_KILL / 3
                    && let Some(tx) = signal.take()
                {
                    let _ = tx.send(());
                    if clients == 1 {
                        // Between two connections: wait for the kill.
                        let _ = killed.wait_for(|k| *k).await;
                    }
                }
                let r = match web::call(&target, "GET", "/orders", &[], None).await {
                    Ok(r) if r.status == 200 => {
                        Ok(r.header(orders::SERVED_BY).unwrap_or("?").to_owned())
                    }
                    Ok(r) => Err(format!("HTTP {}: {}", r.status, r.body.trim())),
                    Err(e) => Err(format!("{e:#}")),
                };
                out.push((*killed.borrow(), r));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            out
        }));
    }
    let _ = kill_rx.await;
    let pid = mesh.kill("orders-2 sidecar");
    drop(app_task);
    let _ = killed_tx.send(true);
    ui.command(&format!(
        "kill -9 {}   # orders-2's sidecar, and its app, under traffic",
        pid.unwrap_or(0)
    ));
    let mut results = Vec::new();
    for h in handles {
        results.extend(h.await.unwrap_or_default());
    }
    let after: Vec<String> = results
        .iter()
        .filter(|(k, _)| *k)
        .filter_map(|(_, r)| r.as_ref().ok().cloned())
        .collect();
    let errors: Vec<String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err().cloned())
        .collect();
    let total = results.len();
    let states = orders_endpoints(&s.web.admin).await;
    ui.say(&format!(
        "{total} requests from {clients} client(s) around the kill: {} failed; after it, \
         answered by {}.",
        errors.len(),
        shown(&counts(&after))
    ));
    for (addr, state) in &states {
        ui.item("orders endpoint ", &format!("{addr} ({state})"));
    }
    ui.say(
        "web's sidecar set the dead endpoint aside at its first refused connection. Nobody \
         told the control plane: the endpoint stops being refreshed and leaves the registry \
         by itself when its lease ends, and then every sidecar's list.",
    );
    if let Some(e) = errors.first() {
        ui.say(&format!("FAILED: {e}"));
        ui.quote(&tail(&mesh.log_of("web sidecar"), 8));
    }
    let ok = spread_ok && errors.is_empty() && total == clients * UNDER_KILL;
    let observed = if ok {
        format!(
            "spread {}; {total} requests around kill -9, 0 failed",
            shown(&spread)
        )
    } else {
        format!(
            "spread {} ({} failed); {} of {total} failed around kill -9",
            shown(&spread),
            failed.len(),
            errors.len()
        )
    };
    let detail = json!({
        "spread": spread,
        "spread_failed": failed.len(),
        "under_kill_requests": total,
        "under_kill_failed": errors.len(),
        "under_kill_errors": errors.iter().take(3).collect::<Vec<_>>(),
        "after_kill_served_by": counts(&after),
        "killed_pid": pid,
        "endpoints_after": states.iter().map(|(a, st)| json!({"address": a, "state": st})).collect::<Vec<_>>(),
    });
    Ok((
        detail,
        if ok { Outcome::Ok } else { Outcome::Failed },
        observed,
    ))
}
