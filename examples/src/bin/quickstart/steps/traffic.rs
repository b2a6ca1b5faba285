//! Steps 4-6: real calls through the mesh, allowed and denied, and why.

use std::path::Path;
use std::time::Duration;

use mayfly_examples::{db, web, xfcc};
use serde_json::json;

use crate::mesh::{Mesh, id, tail};
use crate::report::{Outcome, Report};
use crate::ui::Ui;

use super::{Mode, POLICY_HTTP, Services, is_sidecar_xfcc, leaf_hash, metric, svid, whoami};

/// Step 4: web -> orders, allowed.
pub(crate) async fn web_to_orders(ui: &mut Ui, mesh: &Mesh, s: &Services, report: &mut Report) {
    ui.step("web -> orders: GET (allowed)");
    let before = svid(&s.web.admin).await.ok();
    let w = whoami(s, s.mode == Mode::Http).await;
    let after = svid(&s.web.admin).await.ok();
    ui.command(&format!(
        "curl http://{}/whoami   # as web",
        s.web_to_orders()
    ));
    let mut detail = json!({ "whoami_status": w.status, "xfcc": w.xfcc });
    let mut ok = w.status == 200;
    let mut observed = match &w.error {
        Some(e) => format!("failed: {e}"),
        None => "allowed (200)".to_owned(),
    };
    if let Some(e) = &w.error {
        ui.say(&format!("FAILED: {e}"));
    }
    if w.status == 200 {
        match s.mode {
            Mode::Http => {
                let one = w.xfcc.first().cloned().unwrap_or_default();
                let e = xfcc::parse(&one);
                ui.say("200 OK. The orders app saw this x-forwarded-client-cert:");
                ui.quote(&one.replace(';', ";\n"));
                ui.say(&format!(
                    "web sent a forged one naming spiffe://{}/admin; orders' sidecar removed \
                     it and set its own from the certificate web's sidecar presented.",
                    crate::mesh::TD
                ));
                let hashes: Vec<String> = [&before, &after]
                    .iter()
                    .filter_map(|v| v.as_ref().and_then(leaf_hash))
                    .collect();
                let hash = e.hash.clone().unwrap_or_default().to_ascii_lowercase();
                let matches = hashes.contains(&hash);
                if matches {
                    ui.say("Hash is the SHA-256 of web's current certificate (as web's sidecar reports at GET /svid).");
                } else {
                    ui.say("FAILED: Hash is not the SHA-256 of web's current certificate.");
                    observed = "allowed, but Hash does not match web's certificate".into();
                    ok = false;
                }
                let right = is_sidecar_xfcc(&w);
                if !right {
                    ok = false;
                    observed = "allowed, but x-forwarded-client-cert is not as specified".into();
                }
                detail["xfcc_by"] = json!(e.by);
                detail["xfcc_uri"] = json!(e.uri);
                detail["xfcc_hash"] = json!(e.hash);
                detail["xfcc_hash_matches_web_cert"] = json!(matches);
            }
            Mode::Tcp => {
                ui.say(&format!(
                    "200 OK. The app saw {} x-forwarded-client-cert header: in TCP mode the \
                     sidecar passes bytes and adds no headers. HTTP mode, which does, is {}.",
                    if w.xfcc.is_empty() {
                        "no"
                    } else {
                        "an unexpected"
                    },
                    s.no_http.0
                ));
                if !w.xfcc.is_empty() {
                    ok = false;
                    observed = "allowed, but an identity header appeared in TCP mode".into();
                }
            }
        }
    }
    // orders -> db happens inside GET /orders.
    let r = web::call(s.web_to_orders(), "GET", "/orders", &[], None).await;
    ui.command(&format!(
        "curl http://{}/orders   # as web",
        s.web_to_orders()
    ));
    match &r {
        Ok(r) if r.status == 200 => {
            let n = r
                .json()
                .ok()
                .and_then(|v| v.as_array().map(Vec::len))
                .unwrap_or(0);
            ui.say(&format!(
                "200 OK, {n} orders, which orders read from db through its own sidecar \
                 (orders -> db, allowed)."
            ));
            detail["orders_status"] = json!(200);
            detail["orders_count"] = json!(n);
        }
        Ok(r) => {
            ui.say(&format!("FAILED: HTTP {}: {}", r.status, r.body.trim()));
            detail["orders_status"] = json!(r.status);
            ok = false;
            observed = format!("GET /orders answered {}", r.status);
        }
        Err(e) => {
            ui.say(&format!("FAILED: {e:#}"));
            ok = false;
            observed = format!("GET /orders failed: {e:#}");
        }
    }
    let allowed = metric(
        &s.orders.admin,
        "mayfly_sidecar_connections_total",
        &["direction=\"inbound\"", "decision=\"allow\""],
    )
    .await;
    let requests = metric(&s.orders.admin, "mayfly_sidecar_requests_total", &["allow"]).await;
    detail["orders_inbound_allowed_connections"] = json!(allowed);
    if s.mode == Mode::Tcp && ok {
        ui.say(&format!(
            "orders' sidecar verified web's SVID and allowed the connections by policy \
             (mayfly_sidecar_connections_total inbound allow = {allowed})."
        ));
    } else if requests > 0.0 {
        detail["orders_requests_allowed"] = json!(requests);
    }
    if !ok {
        ui.quote(&tail(&mesh.log_of("orders sidecar"), 5));
    }
    report.push(
        "web_to_orders_get",
        "web -> orders GET",
        "allow",
        observed,
        if ok { Outcome::Ok } else { Outcome::Failed },
        detail,
    );
    // Recorded separately for the table.
    let db_allowed = metric(
        &s.db.admin,
        "mayfly_sidecar_connections_total",
        &["direction=\"inbound\"", "decision=\"allow\""],
    )
    .await;
    let db_ok = matches!(&r, Ok(r) if r.status == 200) && db_allowed >= 1.0;
    report.push(
        "orders_to_db",
        "orders -> db",
        "allow",
        if db_ok {
            "allowed".to_owned()
        } else {
            "failed".to_owned()
        },
        if db_ok { Outcome::Ok } else { Outcome::Failed },
        json!({ "db_inbound_allowed_connections": db_allowed }),
    );
}

/// The decision ID in the last line of `log` that contains `needle` and "denied".
fn decision_in_log(log: &str, needle: &str) -> Option<String> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("denied") && l.contains(needle))?;
    let rest = &line[line.find("decision=")? + "decision=".len()..];
    let v: String = rest
        .trim_start_matches('"')
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"')
        .collect();
    (!v.is_empty()).then_some(v)
}

/// `mayfly-ca policy explain`, shown with its command line.
fn explain(ui: &Ui, mesh: &Mesh, policy: &Path, shown: &str, args: &[&str]) -> Option<String> {
    let p = policy.to_str()?;
    let mut full = vec!["policy", "explain", "--policy", p];
    full.extend_from_slice(args);
    let mut chunks = vec![
        "mayfly-ca policy explain".to_owned(),
        format!("--policy {shown}"),
    ];
    for pair in args.chunks(2) {
        chunks.push(pair.join(" "));
    }
    ui.command_chunks(&chunks);
    match mesh.bins.ca_cmd(&full) {
        Ok((0, out, _)) => {
            ui.quote(out.trim_end());
            Some(out)
        }
        Ok((code, _, err)) => {
            ui.say(&format!(
                "(policy explain failed, exit {code}: {})",
                err.trim()
            ));
            None
        }
        Err(e) => {
            ui.say(&format!("(policy explain could not run: {e:#})"));
            None
        }
    }
}

/// Step 6: web -> orders POST: denied in HTTP mode; not enforceable in TCP mode.
pub(crate) async fn web_post(ui: &mut Ui, mesh: &Mesh, s: &Services, report: &mut Report) {
    ui.step("web -> orders: POST (the policy allows GET only)");
    let body = r#"{"item":"tea"}"#;
    ui.command(&format!(
        "curl -X POST http://{}/orders -d '{body}'",
        s.web_to_orders()
    ));
    let r = web::call(s.web_to_orders(), "POST", "/orders", &[], Some(body.into())).await;
    match s.mode {
        Mode::Http => {
            let (ok, observed, detail) = match &r {
                Ok(r) if r.status == 403 => {
                    let id = r.header("x-mayfly-decision-id").unwrap_or("").to_owned();
                    ui.say(&format!("403 Forbidden, x-mayfly-decision-id: {id}"));
                    let who = if !id.is_empty() && mesh.log_of("web sidecar").contains(&id) {
                        Some("web's own sidecar (egress): the request never left web's host")
                    } else if !id.is_empty() && mesh.log_of("orders sidecar").contains(&id) {
                        Some("orders' sidecar (ingress): the app never saw the request")
                    } else {
                        None
                    };
                    if let Some(who) = who {
                        ui.say(&format!("Decided by {who}."));
                    }
                    (
                        !id.is_empty(),
                        format!("denied (403, {id})"),
                        json!({ "status": 403, "decision_id": id, "decided_by": who }),
                    )
                }
                Ok(r) => {
                    ui.say(&format!(
                        "FAILED: expected 403, got {}: {}",
                        r.status,
                        r.body.trim()
                    ));
                    (
                        false,
                        format!("answered {}", r.status),
                        json!({ "status": r.status }),
                    )
                }
                Err(e) => {
                    ui.say(&format!("FAILED: {e:#}"));
                    (false, format!("failed: {e:#}"), json!({ "status": 0 }))
                }
            };
            ui.say("Why, rule by rule:");
            let ex = explain(
                ui,
                mesh,
                &s.policy,
                "examples/policies/quickstart-http.toml",
                &[
                    "--from",
                    &id("web"),
                    "--to",
                    &id("orders"),
                    "--method",
                    "POST",
                    "--path",
                    "/orders",
                ],
            );
            let mut detail = detail;
            detail["explain"] = json!(ex);
            report.push(
                "web_to_orders_post",
                "web -> orders POST",
                "deny",
                observed,
                if ok { Outcome::Ok } else { Outcome::Failed },
                detail,
            );
        }
        Mode::Tcp => {
            let status = r.as_ref().map(|r| r.status).unwrap_or(0);
            ui.say(&format!(
                "Answered {status}: in TCP mode the sidecars authorize the connection (web may \
                 talk to orders), not each request, so a GET-only rule cannot be enforced \
                 here. Method-level rules need the sidecar's HTTP mode, which is {}.",
                s.no_http.0
            ));
            ui.say("The policy engine already decides per request; under the HTTP policy:");
            let http_policy = mesh.dir().join("policy-http.toml");
            let ex = match std::fs::write(&http_policy, POLICY_HTTP) {
                Ok(()) => explain(
                    ui,
                    mesh,
                    &http_policy,
                    "examples/policies/quickstart-http.toml",
                    &[
                        "--from",
                        &id("web"),
                        "--to",
                        &id("orders"),
                        "--method",
                        "POST",
                        "--path",
                        "/orders",
                    ],
                ),
                Err(_) => None,
            };
            report.push(
                "web_to_orders_post",
                "web -> orders POST",
                "deny",
                format!("not enforceable in TCP mode (answered {status})"),
                s.no_http.1,
                json!({ "status": status, "reason": format!("sidecar HTTP mode {}", s.no_http.0), "explain": ex }),
            );
        }
    }
}

/// Step 7: web -> db, denied.
pub(crate) async fn web_to_db(ui: &mut Ui, mesh: &Mesh, s: &Services, report: &mut Report) {
    ui.step("web -> db (no rule allows it)");
    ui.say(
        "web's sidecar has an upstream for db (a misconfiguration, or an attacker on web's \
         host, would use it). web tries to read from db:",
    );
    ui.command(&format!(
        "printf 'KEYS order:\\n' | nc {}",
        s.web_to_db().replace(':', " ")
    ));
    let attempt = async {
        let mut c = db::Client::connect(s.web_to_db()).await?;
        c.command("KEYS order:").await
    }
    .await;
    let mut detail = json!({});
    let (ok, observed) = match attempt {
        Ok(reply) => {
            ui.say(&format!("FAILED: db answered {reply:?}"));
            (false, "allowed (db answered)".to_owned())
        }
        Err(e) => {
            // The denial is logged just before the connection closes.
            let mut id = None;
            for _ in 0..40 {
                id = decision_in_log(&mesh.log_of("web sidecar"), "upstream=db");
                if id.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            ui.say(&format!(
                "Refused: {}.",
                format!("{e:#}").trim_end_matches('.')
            ));
            match &id {
                Some(d) => ui.say(&format!(
                    "web's sidecar denied it before dialling db (egress policy), decision {d}."
                )),
                None => ui.say("web's sidecar closed the connection (egress policy)."),
            }
            detail["decision_id"] = json!(id);
            (
                true,
                format!(
                    "denied{}",
                    id.map(|d| format!(" ({d})")).unwrap_or_default()
                ),
            )
        }
    };
    let denied = metric(
        &s.web.admin,
        "mayfly_sidecar_connections_total",
        &["direction=\"outbound\"", "decision=\"deny\""],
    )
    .await;
    detail["web_outbound_denied_connections"] = json!(denied);
    let ex = explain(
        ui,
        mesh,
        &s.policy,
        match s.mode {
            Mode::Http => "examples/policies/quickstart-http.toml",
            Mode::Tcp => "examples/policies/quickstart-tcp.toml",
        },
        &["--from", &id("web"), "--to", &id("db")],
    );
    detail["explain"] = json!(ex);
    ui.say("db's own sidecar would refuse web too: the same policy is checked on both ends.");
    report.push(
        "web_to_db",
        "web -> db",
        "deny",
        observed,
        if ok { Outcome::Ok } else { Outcome::Failed },
        detail,
    );
}
