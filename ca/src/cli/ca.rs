//! The offline commands on a data directory's CA: `mayfly-ca init`, `bundle show` and
//! `ca status`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use mayfly_ca::authority::AuthorityConfig;
use mayfly_ca::duration::format_duration;
use mayfly_ca::server;
use serde_json::Value;

use super::{DataDirArg, when};

#[derive(Subcommand)]
pub(super) enum BundleCmd {
    /// Print the trust bundle.
    Show {
        #[command(flatten)]
        dir: DataDirArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "jwks")]
        format: BundleFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum BundleFormat {
    Pem,
    Jwks,
    /// The active root's pin (hex SHA-256 of its SubjectPublicKeyInfo), for `ca_pin` and
    /// `mayfly-sidecar inject --ca-pin`.
    Pin,
}

#[derive(Subcommand)]
pub(super) enum CaCmd {
    /// Each authority, its state and expiry.
    Status {
        #[command(flatten)]
        dir: DataDirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `mayfly-ca init`: a new data directory with a root and an intermediate CA.
pub(super) fn init(
    dir: &DataDirArg,
    trust_domain: &str,
    root_ttl: Duration,
    intermediate_ttl: Duration,
    exist_ok: bool,
) -> Result<()> {
    let data_dir = dir.data_dir.as_path();
    let opts = dir.store.options()?;
    let existing = if exist_ok {
        match server::open_with(data_dir, &opts) {
            Ok((_, _, a)) => Some(a),
            Err(e) if e.is_not_initialised() => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    if let Some(a) = existing {
        if a.trust_domain().as_str() != trust_domain {
            bail!(
                "{} already holds a CA for trust domain {}, not {trust_domain}",
                data_dir.display(),
                a.trust_domain()
            );
        }
        println!(
            "trust domain {} already initialised in {}",
            a.trust_domain(),
            data_dir.display()
        );
        return Ok(());
    }
    let a = server::init_with(
        data_dir,
        trust_domain,
        AuthorityConfig {
            root_ttl,
            intermediate_ttl,
        },
        &opts,
    )?;
    println!(
        "initialised trust domain {} in {} (root CA valid {}, intermediate {})",
        a.trust_domain(),
        data_dir.display(),
        format_duration(root_ttl),
        format_duration(intermediate_ttl)
    );
    Ok(())
}

/// `mayfly-ca bundle show`.
pub(super) fn bundle(cmd: BundleCmd) -> Result<()> {
    let BundleCmd::Show { dir, format } = cmd;
    let (_, _, a) = dir.open()?;
    let b = server::bundle_of(&a)?;
    match format {
        BundleFormat::Pem => print!("{}", b.to_pem()),
        BundleFormat::Jwks => println!("{}", b.to_jwks()),
        BundleFormat::Pin => {
            let root = a
                .active(mayfly_ca::authority::Role::Root)
                .context("no active root CA")?;
            let spki = mayfly_ca::svid::spki_der(&root.cert)?;
            println!("{}", hex::encode(mayfly_ca::keys::sha256(&spki)));
        }
    }
    Ok(())
}

/// `mayfly-ca ca status`.
pub(super) fn status(cmd: CaCmd) -> Result<()> {
    let CaCmd::Status { dir, json } = cmd;
    let (_, _, a) = dir.open()?;
    let v = server::status_json(&a);
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_status(&v);
    }
    Ok(())
}

fn print_status(v: &Value) {
    println!(
        "trust domain: {}",
        v["trust_domain"].as_str().unwrap_or("?")
    );
    println!("bundle sequence: {}", v["bundle_sequence"]);
    println!(
        "{:<18} {:<13} {:<9} {:<22} IN",
        "ID", "ROLE", "STATE", "EXPIRES"
    );
    for a in v["authorities"].as_array().into_iter().flatten() {
        println!(
            "{:<18} {:<13} {:<9} {:<22} {}",
            a["id"].as_str().unwrap_or("?"),
            a["role"].as_str().unwrap_or("?"),
            a["state"].as_str().unwrap_or("?"),
            when(a["not_after"].as_i64().unwrap_or_default()),
            a["expires_in"].as_str().unwrap_or("?"),
        );
    }
}
