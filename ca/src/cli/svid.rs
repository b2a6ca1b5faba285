//! `mayfly-ca svid mint`: an SVID for a workload outside the mesh, signed offline with the
//! data directory's active intermediate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use mayfly_ca::duration::parse_duration;
use mayfly_ca::server::{self, admin};

use super::{DataDirArg, when};

#[derive(Subcommand)]
pub(super) enum SvidCmd {
    /// Sign an SVID with the CA's active intermediate and write it to files.
    Mint {
        #[command(flatten)]
        dir: DataDirArg,
        /// The SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime (1s to 60m).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        ttl: Duration,
        /// Output directory: svid.pem, svid.key (0600), bundle.pem, bundle.json.
        #[arg(long)]
        out: PathBuf,
        /// Print JSON (spiffe_id, serial, not_after, files).
        #[arg(long)]
        json: bool,
    },
}

/// Runs `mayfly-ca svid ...`.
pub(super) fn run(cmd: SvidCmd) -> Result<()> {
    match cmd {
        SvidCmd::Mint {
            dir,
            spiffe_id,
            ttl,
            out,
            json,
        } => mint(&dir, &spiffe_id, ttl, &out, json),
    }
}

fn mint(dir: &DataDirArg, id: &str, ttl: Duration, out: &Path, json: bool) -> Result<()> {
    use mayfly_ca::keys::{SecretKey, pem_encode};
    let id = mayfly_ca::id::parse_issuable_id(id)?;
    let (_dd, store, authorities) = dir.open()?;
    let key = SecretKey::generate()?;
    let now = time::OffsetDateTime::now_utc();
    let signer = authorities.signer().context("no active intermediate CA")?;
    let issued = mayfly_ca::issue::issue_for_key(signer, &key, &id, ttl, now)?;
    let bundle = server::bundle_of(&authorities)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let chain: String = issued
        .chain
        .iter()
        .map(|c| pem_encode("CERTIFICATE", c))
        .collect();
    std::fs::write(out.join("svid.pem"), chain).context("cannot write svid.pem")?;
    server::datadir::write_secret(&out.join("svid.key"), key.to_pem().as_bytes())
        .context("cannot write svid.key")?;
    std::fs::write(out.join("bundle.pem"), bundle.to_pem()).context("cannot write bundle.pem")?;
    std::fs::write(out.join("bundle.json"), bundle.to_jwks())
        .context("cannot write bundle.json")?;
    let who = admin::user_name(nix::unistd::getuid().as_raw());
    store.log_issued(&mayfly_ca::store::IssuedRecord {
        serial: issued.serial.clone(),
        spiffe_id: id.to_string(),
        not_after: issued.not_after,
        issued_at: now,
        requester: format!("admin:{who}"),
    })?;
    store.append_event(
        now,
        "svid.minted",
        &serde_json::json!({ "spiffe_id": id.to_string(), "serial": issued.serial, "by": who })
            .to_string(),
    )?;
    if json {
        let file = |name: &str| out.join(name).display().to_string();
        let v = serde_json::json!({
            "spiffe_id": id.to_string(),
            "serial": issued.serial,
            "not_after": issued.not_after.unix_timestamp(),
            "files": {
                "svid": file("svid.pem"),
                "key": file("svid.key"),
                "bundle_pem": file("bundle.pem"),
                "bundle_jwks": file("bundle.json"),
            },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "minted {id} (serial {}, expires {}) into {}",
        issued.serial,
        when(issued.not_after.unix_timestamp()),
        out.display()
    );
    Ok(())
}
