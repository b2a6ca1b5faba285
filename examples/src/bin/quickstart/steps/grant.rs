//! Step 9: just-in-time access, for real. web -> db is denied (step 7); a grant lets web read
//! db for a few seconds; a long-lived connection it admitted is cut when the grant expires (by
//! the sidecars' own clocks); a new connection is denied again; the control plane lists the
//! grant as expired and the audit trail tells the whole story.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mayfly_examples::db;
use serde_json::{Value, json};

use crate::mesh::{Mesh, id};
use crate::report::{Outcome, Report};
use crate::ui::Ui;

use super::{Services, svid};

/// Why the grant is asked for (a ticket or an incident, in real life).
const REASON: &str = "quickstart demo";
/// How often the long-lived connection sends a command.
const BEAT: Duration = Duration::from_millis(200);

/// Unix time now, in seconds.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `HH:MM:SS` (UTC) of a Unix time.
pub(super) fn clock(unix: i64) -> String {
    let s = unix.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The grant's lifetime: 8 s, shorter when SVIDs are so short-lived that a connection would
/// end with its peer's certificate first (`--svid-ttl`).
fn grant_ttl(s: &Services) -> u64 {
    (s.svid_ttl_secs() / 2).saturating_sub(1).clamp(2, 8)
}

/// The shorter remaining lifetime of web's and db's SVIDs, in seconds.
async fn svids_left(s: &Services) -> Option<f64> {
    let mut left = f64::MAX;
    for admin in [&s.web.admin, &s.db.admin] {
        left = left.min(svid(admin).await.ok()?.get("expires_in")?.as_f64()?);
    }
    Some(left)
}

/// What web reads from db in one connection (`KEYS order:`), as in step 7.
async fn read_db(addr: &str) -> anyhow::Result<String> {
    let mut c = db::Client::connect(addr).await?;
    tokio::time::timeout(Duration::from_secs(2), c.command("KEYS order:"))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 2 s"))?
}

/// How the long-lived connection ended.
struct Cut {
    at: Instant,
    opened: Instant,
    how: String,
}

/// One connection web -> db, sending `INCR` every [`BEAT`] until it is cut (or `until`).
async fn hold(addr: &str, replies: &AtomicU64, until: Instant) -> Result<Option<Cut>, String> {
    let mut c = db::Client::connect(addr)
        .await
        .map_err(|e| format!("cannot open the connection: {e:#}"))?;
    let opened = Instant::now();
    while Instant::now() < until {
        let r = tokio::time::timeout(Duration::from_secs(2), c.command("INCR grant:beats")).await;
        let how = match r {
            Ok(Ok(_)) => {
                replies.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(BEAT).await;
                continue;
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "no answer for 2 s".to_owned(),
        };
        if replies.load(Ordering::Relaxed) == 0 {
            return Err(format!("the connection was refused at once ({how})"));
        }
        return Ok(Some(Cut {
            at: Instant::now(),
            opened,
            how,
        }));
    }
    Ok(None)
}

/// `mayfly-ca ARGS --data-dir D --json`: one JSON document, or one per line.
fn ca_json(mesh: &Mesh, args: &[&str]) -> Result<Vec<Value>, String> {
    let dd = mesh.data_dir().display().to_string();
    let mut full = args.to_vec();
    full.extend_from_slice(&["--data-dir", &dd, "--json"]);
    let shown = format!("mayfly-ca {}", args[..2.min(args.len())].join(" "));
    let (code, out, err) = mesh.bins.ca_cmd(&full).map_err(|e| format!("{e:#}"))?;
    if code != 0 {
        return Err(format!("{shown} failed (exit {code}): {}", err.trim()));
    }
    if let Ok(v) = serde_json::from_str::<Value>(&out) {
        return Ok(match v {
            Value::Array(a) => a,
            v => vec![v],
        });
    }
    Ok(out
        .lines()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect())
}

/// `web`, `db`, `ca` for a record's source.
fn who(r: &Value) -> String {
    let src = r["source"].as_str().unwrap_or("");
    match src.rsplit_once('/') {
        Some((_, "ca")) => "control plane".to_owned(),
        Some((_, name)) => name.to_owned(),
        None => src.to_owned(),
    }
}

/// Whether this build has `mayfly-ca grant`.
fn has_grants(mesh: &Mesh) -> bool {
    match mesh.bins.ca_cmd(&["grant", "--help"]) {
        Ok((0, out, _)) => out.contains("request") && out.contains("approve"),
        _ => false,
    }
}

/// Step 9.
pub(crate) async fn grant(ui: &mut Ui, mesh: &Mesh, s: &Services, report: &mut Report) {
    let ttl = grant_ttl(s);
    ui.step(&format!(
        "Just-in-time access: web -> db for {ttl} seconds, by grant"
    ));
    if !has_grants(mesh) {
        ui.say("mayfly-ca grant is not available in this build (would show a time-boxed grant for web -> db).");
        report.push(
            "jit_grant",
            "JIT grant",
            "-",
            "not available in this build",
            Outcome::Unavailable,
            json!({ "available": false }),
        );
        return;
    }
    let mut detail = json!({ "available": true, "ttl_secs": ttl });
    let r = demo(ui, mesh, s, ttl, &mut detail).await;
    let (observed, outcome) = match r {
        Ok(observed) => (observed, Outcome::Ok),
        Err(why) => {
            ui.say(&format!("FAILED: {why}"));
            detail["reason"] = json!(why);
            (format!("failed: {why}"), Outcome::Failed)
        }
    };
    report.push(
        "jit_grant",
        "JIT grant web->db",
        "open, cut",
        observed,
        outcome,
        detail,
    );
}

async fn demo(
    ui: &Ui,
    mesh: &Mesh,
    s: &Services,
    ttl: u64,
    d: &mut Value,
) -> Result<String, String> {
    let (from, to) = (id("web"), id("db"));
    ui.say(
        "web -> db was denied in step 7: no standing access, and none is wanted. Someone who \
         needs it (an incident, a migration) asks for a grant: exact caller and callee, a \
         reason, a lifetime.",
    );
    // A connection also ends when a peer's certificate expires; with short-lived SVIDs, start
    // when both outlive the grant so that what cuts the connection is the grant.
    let need = ttl as f64 + 2.0;
    if svids_left(s).await.is_none_or(|l| l < need) {
        let started = Instant::now();
        let limit = Duration::from_secs(s.svid_ttl_secs() + 5);
        let wait = async {
            while started.elapsed() < limit {
                if svids_left(s).await.is_some_and(|l| l >= need) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        ui.progress(
            &format!(
                "waiting until web's and db's SVIDs outlive the grant ({}s SVIDs)",
                s.svid_ttl_secs()
            ),
            wait,
        )
        .await;
    }

    // 1. The request.
    let ttl_arg = format!("{ttl}s");
    ui.command_chunks(&[
        "mayfly-ca grant request".to_owned(),
        format!("--from {from}"),
        format!("--to {to}"),
        format!("--ttl {ttl_arg}"),
        format!("--reason \"{REASON}\""),
        "--json".to_owned(),
    ]);
    let sent = Instant::now();
    let g = ca_json(
        mesh,
        &[
            "grant", "request", "--from", &from, "--to", &to, "--ttl", &ttl_arg, "--reason", REASON,
        ],
    );
    let requested = Instant::now();
    let now = unix_now();
    let g = g?
        .into_iter()
        .next()
        .ok_or("mayfly-ca grant request printed no JSON")?;
    let gid = g["id"].as_str().unwrap_or("").to_owned();
    let state = g["state"].as_str().unwrap_or("").to_owned();
    let expires = g["expires"].as_i64();
    d["grant_id"] = json!(gid);
    d["state"] = json!(state);
    d["expires"] = json!(expires);
    d["requested_by"] = g["requested_by"].clone();
    let (Some(expires), "active") = (expires, state.as_str()) else {
        return Err(format!("grant {gid:?} is {state:?}, not active"));
    };
    let left = expires as f64 - now;
    let exp_at = requested + Duration::from_secs_f64(left.max(0.0));
    ui.item(
        "grant  ",
        &format!(
            "{gid}: {state}, requested by {}, until {} UTC ({left:.1}s from now)",
            g["requested_by"].as_str().unwrap_or("?"),
            clock(expires),
        ),
    );
    ui.say(&format!(
        "Active at once because this demo's policy says approvals = 0. In production set \
         approvals = 1: the grant waits, pending, until a second admin (another OS user on the \
         control plane's admin socket) runs mayfly-ca grant approve {gid}; the requester \
         never can, and a try is refused and recorded."
    ));

    // 2. Propagation: the same read as in step 7, until it passes.
    ui.say("The control plane pushes the grant to every sidecar. web tries db again:");
    ui.command(&format!(
        "printf 'KEYS order:\\n' | nc {}",
        s.web_to_db().replace(':', " ")
    ));
    let limit = Duration::from_secs(3).min(exp_at.saturating_duration_since(sent));
    let mut tries = 0u32;
    let reply = loop {
        tries += 1;
        match read_db(s.web_to_db()).await {
            Ok(r) => break Some(r),
            Err(_) if sent.elapsed() < limit => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => break None,
        }
    };
    // From the moment the request was sent (the control plane pushes the grant before the
    // command even returns).
    let propagation = sent.elapsed().as_secs_f64();
    d["propagation_secs"] = json!(propagation);
    d["tries"] = json!(tries);
    let Some(reply) = reply else {
        return Err(format!(
            "web -> db still denied {propagation:.1}s after the grant ({tries} tries)"
        ));
    };
    ui.quote(&reply);
    let at_try = if tries == 1 {
        "at the first try".to_owned()
    } else {
        format!("at try {tries}, 50 ms apart")
    };
    ui.say(&format!(
        "Allowed, {propagation:.2}s after the request was sent ({at_try}): in that time the \
         grant reached web's sidecar (egress) and db's (ingress)."
    ));

    // 3. A long-lived connection, cut at expiry.
    ui.say(&format!(
        "Now one long-lived connection web -> db, sending INCR every {} ms. Each sidecar ends \
         the grant by its own clock (it would end on time with the control plane down), and \
         closes what it admitted:",
        BEAT.as_millis()
    ));
    let replies = Arc::new(AtomicU64::new(0));
    let give_up = exp_at + Duration::from_secs(5);
    let held = hold(s.web_to_db(), &replies, give_up);
    tokio::pin!(held);
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
    let cut = loop {
        tokio::select! {
            r = &mut held => break r,
            _ = tick.tick() => {
                let n = replies.load(Ordering::Relaxed);
                let now = Instant::now();
                let when = if now < exp_at {
                    format!("expires in {:>2}s", exp_at.duration_since(now).as_secs_f64().ceil())
                } else {
                    format!("expired {:.1}s ago", now.duration_since(exp_at).as_secs_f64())
                };
                ui.item("", &format!("{when}   connection open, {n} replies so far"));
            }
        }
    };
    let n = replies.load(Ordering::Relaxed);
    d["replies"] = json!(n);
    let cut = cut?.ok_or("the connection was still open 5 s after the grant expired")?;
    let after_expiry = if cut.at >= exp_at {
        cut.at.duration_since(exp_at).as_secs_f64()
    } else {
        -exp_at.duration_since(cut.at).as_secs_f64()
    };
    let open_for = cut.at.duration_since(cut.opened).as_secs_f64();
    d["cut_after_expiry_secs"] = json!(after_expiry);
    d["connection_secs"] = json!(open_for);
    d["cut"] = json!(cut.how);
    ui.item(
        "",
        &format!(
            "cut: {}, {after_expiry:+.2}s from the grant's expiry, after {open_for:.1}s and \
             {n} replies",
            cut.how.trim_end_matches('.')
        ),
    );
    if after_expiry < -0.5 {
        return Err(format!(
            "the connection was cut {:.1}s before the grant expired ({})",
            -after_expiry, cut.how
        ));
    }
    if after_expiry > 2.0 {
        return Err(format!(
            "the connection was cut {after_expiry:.1}s after the grant expired"
        ));
    }

    // 4. Denied again.
    ui.command(&format!(
        "printf 'KEYS order:\\n' | nc {}   # again",
        s.web_to_db().replace(':', " ")
    ));
    let again = read_db(s.web_to_db()).await;
    d["denied_after"] = json!(again.is_err());
    match &again {
        Ok(r) => return Err(format!("a new connection after expiry was allowed ({r})")),
        Err(e) => ui.say(&format!(
            "Refused: {}. Back to no standing access.",
            format!("{e:#}").trim_end_matches('.')
        )),
    }

    // 5. The control plane's view, and the audit trail.
    ui.command("mayfly-ca grant list");
    let dd = mesh.data_dir().display().to_string();
    let list = match mesh.bins.ca_cmd(&["grant", "list", "--data-dir", &dd]) {
        Ok((0, out, _)) => out,
        Ok((code, _, err)) => return Err(format!("grant list failed ({code}): {}", err.trim())),
        Err(e) => return Err(format!("grant list: {e:#}")),
    };
    ui.quote(list.trim_end());
    let listed = list
        .lines()
        .any(|l| l.contains(&gid) && l.contains("expired"));
    d["listed_expired"] = json!(listed);
    if !listed {
        return Err(format!("grant list does not show {gid} as expired"));
    }
    audit(ui, mesh, &gid, d).await?;

    Ok(format!(
        "open after {propagation:.1}s, cut {after_expiry:+.1}s from expiry, then denied"
    ))
}

/// `audit query --grant ID`: the connections the grant admitted, and how they ended;
/// `--kind grant.requested` and `grant.expired`: the control plane's events.
async fn audit(ui: &Ui, mesh: &Mesh, gid: &str, d: &mut Value) -> Result<(), String> {
    ui.say("Every decision made under the grant names it in the audit trail:");
    ui.command(&format!("mayfly-ca audit query --grant {gid} --json"));
    let started = Instant::now();
    let cut_recorded = |recs: &[Value]| {
        recs.iter()
            .any(|r| r["kind"] == "connection.close" && r["end"] == "policy_revoked")
    };
    let wait = async {
        loop {
            let recs = ca_json(mesh, &["audit", "query", "--grant", gid]).unwrap_or_default();
            if cut_recorded(&recs) || started.elapsed() > Duration::from_secs(15) {
                return recs;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let recs = ui
        .progress(
            "waiting for the sidecars' records to reach the control plane",
            wait,
        )
        .await;
    let lines: Vec<String> = recs
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
            let seq = format!("#{}", r["seq"]);
            let mut l = format!("{:<13} {seq:<4} {:<17}", who(r), s("kind"));
            if !s("decision").is_empty() {
                l.push_str(&format!(" {} {}", s("direction"), s("decision")));
            }
            if !s("end").is_empty() {
                l.push_str(&format!(" end={}", s("end")));
            }
            l
        })
        .collect();
    ui.quote(&lines.join("\n"));
    ui.say("(condensed: writer, sequence number, kind, direction, decision, how it ended)");
    let by_kind = |k: &str| recs.iter().filter(|r| r["kind"] == k).count();
    d["audit_records"] = json!(recs.len());
    d["audit_opened"] = json!(by_kind("connection.open"));
    d["audit_closed"] = json!(by_kind("connection.close"));
    let ends: Vec<&str> = recs
        .iter()
        .filter(|r| r["kind"] == "connection.close")
        .filter_map(|r| r["end"].as_str())
        .collect();
    d["audit_ends"] = json!(ends);
    if !cut_recorded(&recs) {
        return Err(format!(
            "no connection.close with end=policy_revoked under {gid} in the audit trail ({} \
             records)",
            recs.len()
        ));
    }

    // The control plane's own events: the request, and the expiry it records by itself.
    let mut found = Vec::new();
    for kind in ["grant.requested", "grant.expired"] {
        let started = Instant::now();
        let hit = loop {
            let hit = ca_json(mesh, &["audit", "query", "--kind", kind])
                .unwrap_or_default()
                .into_iter()
                .find(|r| r.to_string().contains(gid));
            if hit.is_some() || started.elapsed() > Duration::from_secs(5) {
                break hit;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        ui.command(&format!("mayfly-ca audit query --kind {kind} --json"));
        match &hit {
            Some(r) => {
                let ts = r["ts_ms"].as_i64().unwrap_or(0);
                ui.quote(&format!(
                    "{} #{} {kind} {gid}, at {}.{:03} UTC",
                    who(r),
                    r["seq"],
                    clock(ts / 1000),
                    ts % 1000
                ));
            }
            None => ui.say(&format!("(no {kind} event for {gid})")),
        }
        d[kind.replace('.', "_")] = json!(hit.is_some());
        if hit.is_some() {
            found.push(kind);
        }
    }
    if found.len() != 2 {
        return Err(format!(
            "the audit trail lacks grant events for {gid}: found {found:?}"
        ));
    }
    ui.say(
        "Who asked, why, for how long, what it was used for, and when it ended: all on \
         record, in the same hash-chained trail as every other decision.",
    );
    Ok(())
}
