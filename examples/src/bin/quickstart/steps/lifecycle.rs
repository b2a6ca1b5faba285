//! Steps 7 and 9 and the summary: rotation, the audit trail.

use std::time::{Duration, Instant};

use mayfly_examples::web;
use serde_json::{Value, json};

use crate::mesh::{Mesh, SidecarSpec};
use crate::report::{Outcome, Report};
use crate::ui::{Ui, table};

use super::{Opts, Services, serial, svid};

/// Step 8: SVIDs rotate by themselves; traffic goes on.
pub(crate) async fn rotation(ui: &mut Ui, s: &Services, report: &mut Report, opts: &Opts) {
    ui.step("SVIDs rotate in the background");
    let ttl = opts.svid_ttl.as_secs();
    ui.say(&format!(
        "Each SVID lives {ttl}s here (5 min by default) and is renewed at about half-life, \
         with a new key each time. Watching web's sidecar:"
    ));
    ui.command(&format!("curl http://{}/svid", s.web.admin));
    let first = match svid(&s.web.admin).await {
        Ok(v) => v,
        Err(e) => {
            ui.say(&format!("FAILED: {e:#}"));
            report.push(
                "svid_rotation",
                "SVID rotation",
                "new serial",
                format!("failed: {e:#}"),
                Outcome::Failed,
                json!({}),
            );
            return;
        }
    };
    let s1 = serial(&first);
    let exp = first.get("expires_in").and_then(Value::as_f64);
    ui.item("serial  ", &s1);
    if let Some(e) = exp {
        ui.item("expires ", &format!("in {e:.0}s"));
    }
    let limit = opts.svid_ttl + Duration::from_secs(15);
    let started = Instant::now();
    let wait = async {
        while started.elapsed() < limit {
            if let Ok(v) = svid(&s.web.admin).await
                && serial(&v) != s1
                && !serial(&v).is_empty()
            {
                return Some(v);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        None
    };
    let next = ui
        .progress("waiting for web's sidecar to renew", wait)
        .await;
    let secs = started.elapsed().as_secs_f64();
    let Some(next) = next else {
        ui.say(&format!("FAILED: no new SVID within {}s", limit.as_secs()));
        report.push(
            "svid_rotation",
            "SVID rotation",
            "new serial",
            "no renewal",
            Outcome::Failed,
            json!({ "serial_before": s1 }),
        );
        return;
    };
    let s2 = serial(&next);
    ui.item("serial  ", &format!("{s2} (new)"));
    let r = web::call(s.web_to_orders(), "GET", "/orders", &[], None).await;
    let flows = matches!(&r, Ok(r) if r.status == 200);
    if flows {
        ui.say(
            "GET /orders still answers 200 through the new certificate: no restart, no \
             dropped request.",
        );
    } else {
        ui.say("FAILED: GET /orders after the rotation did not answer 200.");
    }
    report.push(
        "svid_rotation",
        "SVID rotation",
        "new serial",
        format!("rotated after {secs:.1}s"),
        if flows { Outcome::Ok } else { Outcome::Failed },
        json!({ "serial_before": s1, "serial_after": s2, "seconds": secs, "traffic_after": flows }),
    );
}

/// Whether `mayfly-ca <cmd> --help` exists and mentions every word of `subcommands`.
fn probe(mesh: &Mesh, cmd: &str, subcommands: &[&str]) -> bool {
    match mesh.bins.ca_cmd(&[cmd, "--help"]) {
        Ok((0, out, _)) => subcommands.iter().all(|s| out.contains(s)),
        _ => false,
    }
}

/// Whether this build's sidecar knows the `[audit]` configuration table (and so records its
/// decisions).
fn sidecar_has_audit(mesh: &Mesh) -> bool {
    let spec = SidecarSpec {
        name: "probe",
        workload: "probe",
        inbound: Some(("127.0.0.1:9", "tcp")),
        outbound: vec![],
        svid_ttl: "1m",
    };
    let Ok(path) = mesh.write_config(&spec) else {
        return false;
    };
    let text = format!("{}\n[audit]\n", spec.toml(&mesh.ca_addr));
    let ok =
        std::fs::write(&path, text).is_ok() && mesh.check(&path).is_ok_and(|(code, _)| code == 0);
    let _ = std::fs::remove_file(&path);
    ok
}

/// Step 10: the audit trail, if this build has it.
pub(crate) async fn audit_trail(ui: &mut Ui, mesh: &Mesh, report: &mut Report) {
    ui.step("The audit trail");
    if probe(mesh, "audit", &["verify", "query"]) && sidecar_has_audit(mesh) {
        audit(ui, mesh, report).await;
    } else {
        ui.item(
            "audit trail: ",
            "not available in this build (would show a hash-chained record of every decision \
             above, checked for gaps and edits).",
        );
        report.push(
            "audit_verify",
            "audit verify",
            "-",
            "not available in this build",
            Outcome::Unavailable,
            json!({ "available": false }),
        );
    }
}

/// The denials seen in steps 5 and 6, looked up in the control plane's audit trail, then
/// `mayfly-ca audit verify`.
async fn audit(ui: &Ui, mesh: &Mesh, report: &mut Report) {
    let ids: Vec<String> = ["web_to_orders_post", "web_to_db"]
        .iter()
        .filter_map(|id| report.steps.iter().find(|s| s.id == *id))
        .filter_map(|s| s.detail.get("decision_id")?.as_str().map(str::to_owned))
        .filter(|d| !d.is_empty())
        .collect();
    let dd = mesh.data_dir().display().to_string();
    ui.say(
        "Every decision is a record, hash-chained by the sidecar that made it and shipped to \
         the control plane. The denials above, by decision ID:",
    );
    let query = ["audit", "query", "--data-dir", &dd, "--decision", "deny"];
    let missing = |out: &str| -> Vec<String> {
        ids.iter()
            .filter(|d| !out.contains(d.as_str()))
            .cloned()
            .collect()
    };
    let started = Instant::now();
    let wait = async {
        loop {
            let out = mesh
                .bins
                .ca_cmd(&query)
                .map(|(_, out, _)| out)
                .unwrap_or_default();
            if missing(&out).is_empty() || started.elapsed() > Duration::from_secs(20) {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let out = ui
        .progress("waiting for the records to reach the control plane", wait)
        .await;
    ui.command("mayfly-ca audit query --decision deny");
    let shown: Vec<&str> = out
        .lines()
        .filter(|l| ids.iter().any(|d| l.contains(d.as_str())))
        .collect();
    if !shown.is_empty() {
        ui.quote(&shown.join("\n"));
    }
    let not_found = missing(&out);
    if !not_found.is_empty() {
        ui.say(&format!(
            "FAILED: not in the audit trail after {:.0}s: {}",
            started.elapsed().as_secs_f64(),
            not_found.join(", ")
        ));
    }
    ui.command("mayfly-ca audit verify");
    let (verified, text) = match mesh.bins.ca_cmd(&["audit", "verify", "--data-dir", &dd]) {
        Ok((code, out, err)) => {
            ui.quote(format!("{out}{err}").trim_end());
            (code == 0, out)
        }
        Err(e) => {
            ui.say(&format!("FAILED: {e:#}"));
            (false, String::new())
        }
    };
    let chains = text.lines().filter(|l| l.starts_with("ok ")).count();
    let ok = verified && not_found.is_empty() && !ids.is_empty();
    if ok {
        ui.say(&format!(
            "The denials above are on record, and all {chains} chains verify: nothing \
             missing, nothing edited."
        ));
    }
    report.push(
        "audit_verify",
        "audit verify",
        "recorded",
        if ok {
            format!("{} denials found, {chains} chains ok", ids.len())
        } else if !verified {
            "audit verify failed".to_owned()
        } else {
            format!("{} of {} denials missing", not_found.len(), ids.len())
        },
        if ok { Outcome::Ok } else { Outcome::Failed },
        json!({
            "available": true,
            "decision_ids": ids,
            "missing": not_found,
            "verify_ok": verified,
            "chains_ok": chains,
        }),
    );
}

/// The closing table.
pub(crate) fn summary(ui: &mut Ui, report: &Report) {
    ui.blank();
    ui.title("Summary");
    let rows: Vec<Vec<String>> = report
        .steps
        .iter()
        .map(|s| {
            let mark = match s.outcome {
                Outcome::Ok => "ok",
                Outcome::Failed => "FAIL",
                Outcome::Unavailable => "n/a",
                Outcome::Skipped => "skip",
            };
            vec![
                mark.to_owned(),
                s.label.clone(),
                s.expected.clone(),
                s.observed.clone(),
            ]
        })
        .collect();
    table(
        ui,
        &["", "check", "expected", "observed"],
        &[4, 18, 10, 0],
        &rows,
    );
}
