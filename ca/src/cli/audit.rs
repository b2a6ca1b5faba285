//! `mayfly-ca audit tail|query|verify`: read the audit trail in a data directory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use mayfly_ca::duration::parse_duration;
use mayfly_ca::server;
use mayfly_ca::server::audit::{render, verify_all};
use mayfly_ca::store::AuditFilter;

use super::StoreArg;

/// Audit subcommands.
#[derive(Subcommand)]
// Parsed once per run: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum AuditCmd {
    /// The latest records; with --follow, keep printing new ones.
    Tail {
        /// The control plane's data directory.
        #[arg(long, env = "MAYFLY_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        /// How many records to show first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
        /// Keep printing records as they arrive.
        #[arg(long)]
        follow: bool,
        /// Print raw JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Records matching filters, oldest first.
    Query {
        /// The control plane's data directory.
        #[arg(long, env = "MAYFLY_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        /// From: RFC 3339 time, or a duration ago such as 15m.
        #[arg(long)]
        since: Option<String>,
        /// Until: RFC 3339 time, or a duration ago.
        #[arg(long)]
        until: Option<String>,
        /// The calling side's SPIFFE ID.
        #[arg(long)]
        source: Option<String>,
        /// The called side's SPIFFE ID.
        #[arg(long)]
        destination: Option<String>,
        /// A person's (user SVID's) SPIFFE ID: records where they are the calling side, or
        /// the requester, approver or revoker of access (access.*, admin.*, grant.*).
        #[arg(long)]
        user: Option<String>,
        /// allow or deny.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(mayfly_ca::audit::DECISIONS))]
        decision: Option<String>,
        /// The deciding rule.
        #[arg(long)]
        rule: Option<String>,
        /// The deciding grant.
        #[arg(long)]
        grant: Option<String>,
        /// Record kind (http.request, connection.open, svid.issued, gap, ...).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(mayfly_ca::audit::KINDS))]
        kind: Option<String>,
        /// Most records.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Print raw JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Check every chain: complete, unbroken, correctly signed. Names the first broken record.
    Verify {
        /// The control plane's data directory.
        #[arg(long, env = "MAYFLY_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        /// Print the result as one JSON object (`chains`, `verified`, `broken`).
        #[arg(long)]
        json: bool,
    },
}

fn time_arg(s: &str) -> Result<i64> {
    if let Ok(d) = parse_duration(s) {
        let t = time::OffsetDateTime::now_utc() - time::Duration::seconds(d.as_secs() as i64);
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("{s:?} is neither an RFC 3339 time nor a duration"))?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

fn show(line: &[u8], json: bool) {
    if json {
        println!("{}", String::from_utf8_lossy(line));
    } else {
        println!("{}", render(line));
    }
}

pub(crate) async fn run(cmd: AuditCmd) -> Result<()> {
    match cmd {
        AuditCmd::Tail {
            data_dir,
            store,
            lines,
            follow,
            json,
        } => {
            let (_, store, _) = store.open(&data_dir)?;
            let all = store.audit_after(0, u32::MAX)?;
            let skip = all.len().saturating_sub(lines as usize);
            let mut last = 0;
            for (id, line) in all.into_iter().skip(skip) {
                show(&line, json);
                last = id;
            }
            if !follow {
                return Ok(());
            }
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                for (id, line) in store.audit_after(last, 1000)? {
                    show(&line, json);
                    last = id;
                }
            }
        }
        AuditCmd::Query {
            data_dir,
            store,
            since,
            until,
            source,
            destination,
            user,
            decision,
            rule,
            grant,
            kind,
            limit,
            json,
        } => {
            let (_, store, _) = store.open(&data_dir)?;
            let mut filter = AuditFilter {
                since_ms: since.as_deref().map(time_arg).transpose()?,
                until_ms: until.as_deref().map(time_arg).transpose()?,
                source,
                destination,
                decision,
                rule,
                grant,
                kind,
                limit,
            };
            let lines = match &user {
                None => store.audit_query(&filter)?,
                Some(u) => {
                    // Matched here on each record's fields, so every other filter still applies.
                    filter.limit = u32::MAX;
                    let mut l = store.audit_query(&filter)?;
                    l.retain(|line| involves(line, u));
                    l.truncate(limit as usize);
                    l
                }
            };
            // Said on standard error, so that standard output stays records only; with
            // `--json` no match is an empty stream of JSON lines.
            if lines.is_empty() && !json {
                eprintln!("no records match");
            }
            for line in lines {
                show(&line, json);
            }
            Ok(())
        }
        AuditCmd::Verify {
            data_dir,
            store,
            json,
        } => {
            let (_, store, authorities) = store.open(&data_dir)?;
            let bundle = server::bundle_of(&authorities)?;
            let set = mayfly_ca::bundle::BundleSet::single(bundle);
            let reports = verify_all(store.as_ref(), &set)?;
            if json {
                let chains: Vec<serde_json::Value> = reports
                    .iter()
                    .map(|r| match &r.result {
                        Ok(s) => serde_json::json!({
                            "chain": r.chain, "ok": true, "records": s.records,
                            "checkpoints": s.checkpoints, "last_seq": s.last_seq,
                        }),
                        Err(e) => serde_json::json!({
                            "chain": r.chain, "ok": false, "error": e.to_string(), "seq": e.seq(),
                        }),
                    })
                    .collect();
                let broken = reports.iter().filter(|r| r.result.is_err()).count();
                println!(
                    "{}",
                    serde_json::json!({
                        "chains": chains, "verified": reports.len() - broken, "broken": broken,
                    })
                );
                if broken > 0 {
                    bail!(
                        "{broken} of {} audit chains failed verification",
                        reports.len()
                    );
                }
                return Ok(());
            }
            let mut broken = 0;
            for r in &reports {
                match &r.result {
                    Ok(s) => println!(
                        "ok      {} ({}, {}, last seq {})",
                        r.chain,
                        counted(s.records, "record"),
                        counted(s.checkpoints, "signed checkpoint"),
                        s.last_seq
                    ),
                    Err(e) => {
                        broken += 1;
                        println!("BROKEN  {e}");
                    }
                }
            }
            if broken > 0 {
                bail!(
                    "{broken} of {} audit chains failed verification",
                    reports.len()
                );
            }
            match reports.len() {
                1 => println!("the one audit chain verified"),
                n => println!("all {n} audit chains verified"),
            }
            Ok(())
        }
    }
}

/// Whether a record involves the person `user`: as the calling side of a connection or
/// request, or as the one who asked for, approved, denied or revoked access.
fn involves(line: &[u8], user: &str) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
        return false;
    };
    let field = |k: &str| v.get(k).and_then(serde_json::Value::as_str) == Some(user);
    let kind = v
        .get("kind")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    let caller = match v.get("direction").and_then(serde_json::Value::as_str) {
        Some("inbound") => field("peer_id"),
        Some(_) => field("local_id"),
        None => false,
    };
    let actor = ["access.", "admin.", "grant."]
        .iter()
        .any(|p| kind.starts_with(p))
        && ["user", "approver", "by", "from"].iter().any(|k| field(k));
    caller || actor
}

/// `1 record`, `2 records`.
fn counted(n: impl Into<u64>, noun: &str) -> String {
    match n.into() {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_user_is_found_as_the_caller_or_the_actor_of_access_events_only() {
        let alice = "spiffe://td/user/alice";
        let yes = [
            r#"{"kind":"connection.open","direction":"inbound","peer_id":"spiffe://td/user/alice","local_id":"spiffe://td/db"}"#,
            r#"{"kind":"access.requested","user":"spiffe://td/user/alice"}"#,
            r#"{"kind":"access.approved","user":"spiffe://td/user/bob","approver":"spiffe://td/user/alice"}"#,
            r#"{"kind":"admin.operation","user":"spiffe://td/user/alice"}"#,
        ];
        let no = [
            r#"{"kind":"connection.open","direction":"inbound","peer_id":"spiffe://td/web","local_id":"spiffe://td/user/alice"}"#,
            r#"{"kind":"svid.minted","spiffe_id":"spiffe://td/user/alice","user":"spiffe://td/user/alice"}"#,
            r#"{"kind":"access.requested","user":"spiffe://td/user/alicia"}"#,
            "not json",
        ];
        for l in yes {
            assert!(super::involves(l.as_bytes(), alice), "{l}");
        }
        for l in no {
            assert!(!super::involves(l.as_bytes(), alice), "{l}");
        }
    }

    #[test]
    fn counts_are_spelled_in_the_singular_for_one() {
        assert_eq!(
            super::counted(1u64, "signed checkpoint"),
            "1 signed checkpoint"
        );
        assert_eq!(super::counted(0u64, "record"), "0 records");
        assert_eq!(super::counted(12u64, "record"), "12 records");
    }
}
