//! Steps 1-3: the control plane, the services with their sidecars, the policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mayfly_examples::{db, orders, web};
use serde_json::json;
use tokio::net::TcpListener;

use crate::mesh::{Mesh, SidecarSpec, tail};
use crate::report::{Outcome, Report};
use crate::ui::Ui;

use super::{Mode, Opts, POLICY_HTTP, POLICY_TCP, Services, is_sidecar_xfcc, whoami};

/// Step 1: `mayfly-ca init` and `mayfly-ca run --policy`. The policy is the HTTP one unless
/// TCP was asked for; step 2 changes it if this build's sidecar has no HTTP mode, and the
/// control plane pushes the change.
pub(crate) async fn control_plane(
    ui: &mut Ui,
    mesh: &mut Mesh,
    report: &mut Report,
    opts: &Opts,
) -> anyhow::Result<()> {
    ui.step("Control plane: mayfly-ca init + mayfly-ca run --policy");
    let text = match opts.orders_protocol {
        Some(Mode::Tcp) => POLICY_TCP,
        _ => POLICY_HTTP,
    };
    let policy = mesh.policy_path();
    std::fs::write(&policy, text).with_context(|| format!("cannot write {}", policy.display()))?;
    // The local identity provider first: the control plane trusts it from the start (step 11).
    super::start_idp(ui, mesh).await?;
    let r = ui
        .progress(
            "creating a root CA and an intermediate, starting the control plane",
            mesh.start_control_plane(&policy),
        )
        .await;
    report.pids.clone_from(&mesh.pids);
    r?;
    ui.item(
        "trust domain  ",
        &format!(
            "{} (every identity is spiffe://{}/...)",
            crate::mesh::TD,
            crate::mesh::TD
        ),
    );
    ui.item(
        "listening on  ",
        &format!(
            "{} (pid {})",
            mesh.ca_addr,
            mesh.pids.last().copied().unwrap_or(0)
        ),
    );
    ui.item(
        "data dir      ",
        &format!("{} (temporary)", mesh.data_dir().display()),
    );
    ui.item(
        "policy        ",
        &format!(
            "{}: checked, versioned, reloaded on change, pushed to every sidecar (step 3)",
            policy.display()
        ),
    );
    report.push(
        "control_plane",
        "control plane up",
        "up",
        format!("listening on {}", mesh.ca_addr),
        Outcome::Ok,
        json!({ "address": mesh.ca_addr }),
    );
    Ok(())
}

/// Does this sidecar build accept `protocol = "http"`? `Err(reason)` when it does not. The
/// same configuration in TCP mode must pass, so that only the protocol is being asked about.
fn http_accepted(mesh: &Mesh) -> anyhow::Result<Result<(), String>> {
    let check = |proto: &str| -> anyhow::Result<(i32, String)> {
        let spec = SidecarSpec {
            name: "probe",
            workload: "probe",
            inbound: Some(("127.0.0.1:9", proto)),
            outbound: vec![("orders", "127.0.0.1:9", "orders", proto)],
            svid_ttl: "1m",
        };
        let path = mesh.write_config(&spec)?;
        let r = mesh.check(&path);
        let _ = std::fs::remove_file(&path);
        r
    };
    let (code, err) = check("tcp")?;
    if code != 0 {
        bail!(
            "`mayfly-sidecar check` refused the quickstart's own configuration (exit {code}): {err}"
        );
    }
    let (code, err) = check("http")?;
    if code == 0 {
        return Ok(Ok(()));
    }
    let first = err.lines().next().unwrap_or("").trim().to_owned();
    Ok(Err(format!(
        "`mayfly-sidecar check` refused protocol = \"http\" (exit {code}): {first}"
    )))
}

async fn bind() -> anyhow::Result<(TcpListener, String)> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind 127.0.0.1:0")?;
    let a = l.local_addr().context("local address")?.to_string();
    Ok((l, a))
}

/// Starts db, orders and their sidecars, and web's sidecar, callee first (orders' outbound
/// `remote` is db's inbound address; web finds orders by its SPIFFE ID, among the endpoints
/// its sidecar registered), then waits until every sidecar holds an SVID and enforces the
/// mode's policy, as pushed by the control plane, and web's sidecar knows orders' endpoint.
async fn start_services(mesh: &mut Mesh, mode: Mode, opts: &Opts) -> anyhow::Result<Services> {
    let text = match mode {
        Mode::Http => POLICY_HTTP,
        Mode::Tcp => POLICY_TCP,
    };
    let policy = mesh.policy_path();
    if std::fs::read_to_string(&policy).ok().as_deref() != Some(text) {
        // The control plane sees the change within a second and pushes it.
        std::fs::write(&policy, text)
            .with_context(|| format!("cannot write {}", policy.display()))?;
    }
    let version = mesh.policy_version(&policy)?;
    let ttl = format!("{}s", opts.svid_ttl.as_secs().max(1));
    let proto = mode.as_str();
    let mut tasks = Vec::new();

    let (l, db_app) = bind().await?;
    tasks.push(tokio::spawn(async move {
        let _ = db::serve(l, Arc::new(db::Store::with_sample_orders())).await;
    }));
    let db_sc = mesh
        .start_sidecar(&SidecarSpec {
            name: "db",
            workload: "db",
            inbound: Some((&db_app, "tcp")),
            outbound: vec![],
            svid_ttl: &ttl,
        })
        .await?;
    let db_in = db_sc.inbound.clone().context("db sidecar: no inbound")?;

    let (orders_listener, orders_app) = bind().await?;
    let orders_sc = mesh
        .start_sidecar(&SidecarSpec {
            name: "orders",
            workload: "orders",
            inbound: Some((&orders_app, proto)),
            outbound: vec![("db", &db_in, "db", "tcp")],
            svid_ttl: &ttl,
        })
        .await?;
    orders_sc
        .inbound
        .as_ref()
        .context("orders sidecar: no inbound")?;
    let orders_db = orders_sc
        .outbound
        .get("db")
        .cloned()
        .context("orders sidecar: no outbound db")?;
    tasks.push(tokio::spawn(async move {
        let _ = orders::serve_as(orders_listener, orders_db, "orders-1").await;
    }));

    let web_sc = mesh
        .start_sidecar(&SidecarSpec {
            name: "web",
            workload: "web",
            inbound: None,
            outbound: vec![
                // By identity: every live endpoint registered under orders' SPIFFE ID.
                ("orders", "", "orders", proto),
                ("db", &db_in, "db", "tcp"),
            ],
            svid_ttl: &ttl,
        })
        .await?;
    let s = Services {
        mode,
        web: web_sc,
        orders: orders_sc,
        db: db_sc,
        orders_app,
        db_app,
        policy,
        policy_version: version,
        no_http: (String::new(), Outcome::Skipped),
        svid_ttl: opts.svid_ttl.as_secs(),
        tasks,
    };
    for (name, sc) in [("web", &s.web), ("orders", &s.orders), ("db", &s.db)] {
        wait_ready(mesh, name, &sc.admin, &s.policy_version).await?;
    }
    super::wait_endpoints(mesh, &s.web.admin, 1).await?;
    Ok(s)
}

/// Waits until the sidecar is ready (SVID held, policy received) and enforces `version`.
pub(super) async fn wait_ready(
    mesh: &Mesh,
    name: &str,
    admin: &str,
    version: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    loop {
        if let Ok(r) = web::call(admin, "GET", "/readyz", &[], None).await {
            seen = r.body.trim().to_owned();
            let v = r.json().ok();
            let pushed = v
                .as_ref()
                .and_then(|v| v.get("policy_version")?.as_str().map(str::to_owned));
            if r.status == 200 && pushed.as_deref() == Some(version) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the {name} sidecar was not ready with policy version {version} within 30 s \
                 (/readyz: {seen}):\n{}",
                tail(&mesh.log_of(&format!("{name} sidecar")), 15)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Step 2: the services and their sidecars; HTTP mode for the orders hop when this build has
/// it (checked with `mayfly-sidecar check`, then by the traffic itself), else TCP.
pub(crate) async fn services(
    ui: &mut Ui,
    mesh: &mut Mesh,
    report: &mut Report,
    opts: &Opts,
) -> anyhow::Result<Services> {
    ui.step("Three services, each with its own sidecar");
    ui.say(
        "Each sidecar gets a one-time join token (mayfly-ca token create), trades it for a \
         short-lived SVID, and never writes its private key anywhere.",
    );
    let mut mode = Mode::Http;
    let mut tcp_reason = None;
    let mut no_http = ("not available in this build", Outcome::Unavailable);
    if opts.orders_protocol == Some(Mode::Tcp) {
        mode = Mode::Tcp;
        tcp_reason = Some("--orders-protocol tcp was given".to_owned());
        no_http = (
            "not used in this run (--orders-protocol tcp)",
            Outcome::Skipped,
        );
    } else if let Err(why) = http_accepted(mesh)? {
        if opts.orders_protocol == Some(Mode::Http) {
            bail!("--orders-protocol http: {why}");
        }
        mode = Mode::Tcp;
        tcp_reason = Some(why);
    }
    let started = ui
        .progress(
            "starting db, orders and web sidecars",
            start_services(mesh, mode, opts),
        )
        .await;
    report.pids.clone_from(&mesh.pids);
    let mut s = started?;
    if mode == Mode::Http {
        // The configuration was accepted; does the traffic agree?
        // A few tries, so that one slow first request is not taken for a missing feature.
        let mut w = whoami(&s, false).await;
        for _ in 0..4 {
            if is_sidecar_xfcc(&w) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            w = whoami(&s, false).await;
        }
        if !is_sidecar_xfcc(&w) {
            let seen = w
                .error
                .clone()
                .unwrap_or_else(|| format!("the app saw x-forwarded-client-cert = {:?}", w.xfcc));
            let why = format!(
                "the sidecar accepted protocol = \"http\" but did not proxy HTTP as \
                 specified ({seen})"
            );
            if opts.orders_protocol == Some(Mode::Http) {
                bail!("--orders-protocol http: {why}");
            }
            tcp_reason = Some(why);
            no_http = (
                "not working in this build (see step 2)",
                Outcome::Unavailable,
            );
            drop(s);
            mesh.stop_sidecars();
            s = ui
                .progress(
                    "HTTP mode not usable: restarting the sidecars in TCP mode",
                    start_services(mesh, Mode::Tcp, opts),
                )
                .await?;
            report.pids.clone_from(&mesh.pids);
        }
    }
    s.no_http = (no_http.0.to_owned(), no_http.1);
    report.orders_mode = Some(s.mode.as_str());
    report.tcp_reason.clone_from(&tcp_reason);
    let hop = match s.mode {
        Mode::Http => "HTTP",
        Mode::Tcp => "TCP",
    };
    ui.blank();
    ui.item(
        "db      ",
        &format!(
            "TCP key-value store on {}; sidecar inbound {} (TCP)",
            s.db_app,
            s.db.inbound.as_deref().unwrap_or("?")
        ),
    );
    ui.item(
        "orders  ",
        &format!(
            "HTTP JSON API on {}; sidecar inbound {} ({hop}), outbound to db {} (TCP)",
            s.orders_app,
            s.orders.inbound.as_deref().unwrap_or("?"),
            s.orders.outbound.get("db").map_or("?", String::as_str)
        ),
    );
    ui.item(
        "web     ",
        &format!(
            "front end (its client runs in this process); sidecar outbound to orders {} \
             ({hop}), to db {} (TCP)",
            s.web_to_orders(),
            s.web_to_db()
        ),
    );
    ui.blank();
    ui.say(&format!(
        "All three sidecars are ready: SVID held ({}s lifetime), policy {} received from \
         the control plane. Apps speak plaintext on loopback only; everything between \
         sidecars is TLS 1.3 with both sides' SVIDs.",
        opts.svid_ttl.as_secs(),
        s.policy_version
    ));
    match &tcp_reason {
        None => ui.say(
            "The orders hop runs in HTTP mode: one policy decision per request, and the \
             caller's identity handed to the app.",
        ),
        Some(why) => {
            ui.say(&format!("The orders hop runs in TCP mode: {why}."));
            ui.say(
                "In TCP mode the sidecars decide per connection, so the steps that need \
                 HTTP mode say so below instead of pretending.",
            );
        }
    }
    report.push(
        "services",
        "sidecars ready",
        "ready",
        format!("ready; orders hop in {hop} mode"),
        Outcome::Ok,
        json!({
            "orders_mode": s.mode.as_str(),
            "tcp_reason": tcp_reason,
            "web_admin": s.web.admin,
            "orders_admin": s.orders.admin,
            "db_admin": s.db.admin,
            "policy_version": s.policy_version,
        }),
    );
    Ok(s)
}

/// Step 3: the policy in force.
pub(crate) fn policy(ui: &mut Ui, s: &Services) {
    ui.step("One policy, from the control plane to every sidecar (default deny)");
    let file = match s.mode {
        Mode::Http => "examples/policies/quickstart-http.toml",
        Mode::Tcp => "examples/policies/quickstart-tcp.toml",
    };
    ui.say(&format!(
        "The sidecars have no policy file of their own: mayfly-ca run --policy pushes {file} \
         to each over a long-lived mTLS stream (GET /v1/watch), with the live grants. All \
         three report policy_version {} in /readyz. Its grant limits and rules:",
        s.policy_version
    ));
    // The `[grants]` table and the rules; not the comments nor the `[[service]]` tables.
    let mut keep = false;
    let mut shown = String::new();
    for l in std::fs::read_to_string(&s.policy)
        .unwrap_or_default()
        .lines()
    {
        if l.starts_with('[') {
            keep = l.starts_with("[grants]") || l.starts_with("[[rule]]");
            if keep && !shown.is_empty() {
                shown.push('\n');
            }
        }
        if keep && !l.starts_with('#') && !l.trim().is_empty() {
            shown.push_str(l);
            shown.push('\n');
        }
    }
    ui.quote(shown.trim_end());
    match s.mode {
        Mode::Http => ui.say(
            "So: web may GET from orders, orders may talk to db, and anything else (another \
             method, another caller, another callee) is denied, unless a just-in-time grant \
             allows it for a while (step 9).",
        ),
        Mode::Tcp => ui.say(
            "So: web may connect to orders, orders may connect to db, and anything else is \
             denied, unless a just-in-time grant allows it for a while (step 9).",
        ),
    }
    ui.say(
        "approvals = 0 makes a grant active as soon as it is requested: fine for a \
         one-person demo. In production set approvals = 1: a second admin approves, and the \
         requester never can.",
    );
}
