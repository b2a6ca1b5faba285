//! `mayfly-ca store migrate`: an SQLite store copied into an empty PostgreSQL database.
//! `mayfly-ca store rekey`: the CA keys in PostgreSQL sealed again under a new KEK.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use mayfly_ca::server;
use mayfly_ca::store::{Kek, PostgresStore, SqliteStore, StoreUrl};

#[derive(Subcommand)]
pub(super) enum StoreCmd {
    /// Copy an SQLite store (tokens, issued certificates, events, audit chains, grants, the CA)
    /// into an empty PostgreSQL database, sealing the CA keys under the KEK; then verify every
    /// audit chain there.
    Migrate {
        /// The SQLite store: `sqlite:PATH` (such as sqlite:/var/lib/mayfly/ca.db).
        #[arg(long)]
        from: String,
        /// The PostgreSQL database: `postgres://USER:PASSWORD@HOST:PORT/DB` (empty).
        #[arg(long, env = "MAYFLY_STORE", hide_env_values = true)]
        to: String,
        /// The key-encryption key for the CA keys in PostgreSQL (0600; created when absent).
        /// Default: ca.kek beside the SQLite file (where `run --data-dir` looks for it).
        #[arg(long, env = "MAYFLY_KEK_FILE")]
        kek_file: Option<PathBuf>,
        /// Print what was copied as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Seal the CA keys in a PostgreSQL store again under a new key-encryption key, in one
    /// transaction. Stop the replicas first (or restart each with the new file right after):
    /// a replica holding the old KEK can no longer open the keys.
    Rekey {
        /// The PostgreSQL database: `postgres://USER:PASSWORD@HOST:PORT/DB`.
        #[arg(long, env = "MAYFLY_STORE", hide_env_values = true)]
        store: String,
        /// The KEK the keys are sealed under now.
        #[arg(long, env = "MAYFLY_KEK_FILE")]
        kek_file: PathBuf,
        /// The new KEK (0600; created when absent). Keep the old one until every replica
        /// runs with this one.
        #[arg(long)]
        new_kek_file: PathBuf,
    },
}

/// Runs `mayfly-ca store ...`.
pub(super) fn run(cmd: StoreCmd) -> Result<()> {
    let (from, to, kek_file, json) = match cmd {
        StoreCmd::Migrate {
            from,
            to,
            kek_file,
            json,
        } => (from, to, kek_file, json),
        StoreCmd::Rekey {
            store,
            kek_file,
            new_kek_file,
        } => return rekey(&store, &kek_file, &new_kek_file),
    };
    let from_path = match from.parse::<StoreUrl>().context("--from")? {
        StoreUrl::Sqlite(p) => p,
        StoreUrl::Postgres(_) => bail!("--from must be an SQLite store (sqlite:PATH)"),
    };
    let to_url = match to.parse::<StoreUrl>().context("--to")? {
        StoreUrl::Postgres(u) => u,
        StoreUrl::Sqlite(_) => bail!("--to must be a PostgreSQL database (postgres://...)"),
    };
    if !from_path.is_file() {
        bail!("{} does not exist", from_path.display());
    }
    let kek_path = kek_file.unwrap_or_else(|| {
        from_path
            .parent()
            .unwrap_or_else(|| std::path::Path::new("."))
            .join(server::KEK_FILE)
    });
    let source = SqliteStore::open(&from_path)
        .with_context(|| format!("cannot open {}", from_path.display()))?;
    let (kek, created) = Kek::load_or_create(&kek_path)?;
    let dest = PostgresStore::open(&to_url, kek);
    let result = dest.map_err(anyhow::Error::from).and_then(|dest| {
        server::migrate::migrate(&source, &dest)
            .map(|done| (done, dest.target().to_owned()))
            .map_err(anyhow::Error::from)
    });
    let (done, target) = match result {
        Ok(r) => r,
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(&kek_path); // it sealed nothing that stays
            }
            return Err(e);
        }
    };
    if json {
        println!("{}", serde_json::to_string(&done)?);
    } else {
        println!(
            "copied {} into PostgreSQL at {target}: {} tokens, {} issued certificates, {} audit chains ({} records, every chain verified), {} grants, {} CA authorities (keys sealed under {}{})",
            from_path.display(),
            done.tokens,
            done.issued,
            done.chains,
            done.records,
            done.grants,
            done.authorities,
            kek_path.display(),
            if created { ", created" } else { "" },
        );
    }
    Ok(())
}

/// `mayfly-ca store rekey`.
fn rekey(store: &str, old: &std::path::Path, new: &std::path::Path) -> Result<()> {
    let url = match store.parse::<StoreUrl>().context("--store")? {
        StoreUrl::Postgres(u) => u,
        StoreUrl::Sqlite(_) => {
            bail!("--store must be a PostgreSQL database: SQLite stores keep no sealed keys")
        }
    };
    if std::fs::canonicalize(old).ok() == std::fs::canonicalize(new).ok() && new.exists() {
        bail!("--new-kek-file must be another file than --kek-file");
    }
    let old_kek = Kek::load(old)?;
    let (new_kek, created) = Kek::load_or_create(new)?;
    match server::rekey(&url, old_kek, new_kek) {
        Ok(n) => {
            println!(
                "sealed {n} CA keys again under {}{}: give every replica this file (--kek-file) and restart it, then retire {}",
                new.display(),
                if created { " (created)" } else { "" },
                old.display()
            );
            Ok(())
        }
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(new); // it sealed nothing that stays
            }
            Err(e.into())
        }
    }
}
