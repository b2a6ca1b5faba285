//! People in end-to-end tests: a user SVID minted the way an administrator could
//! (`mayfly-ca svid mint` for `spiffe://mayfly.local/user/<name>`), written as the `mayfly`
//! CLI's credentials file, and the sign-in's groups recorded in the control plane's store
//! (`Store::put_user_session`), as `POST /v1/user/svid` does after verifying an ID token. Once
//! the sign-in branch lands, tests can sign in through a real identity provider instead; this
//! is the one place that stands in for it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mayfly_ca::store::{StoreUrl, UserSession};
use mayfly_sidecar::user::creds::{self, Credentials};

use crate::{Ca, bin};

/// A person with credentials in their own configuration directory.
pub struct Person {
    /// The user SVID's SPIFFE ID.
    pub id: String,
    /// `MAYFLY_CONFIG_DIR` for this person's `mayfly` commands.
    pub config_dir: PathBuf,
}

/// Signs `name` in: a user SVID living `ttl` (such as `5m`) in `<dir>/<name>-config`, and a
/// sign-in with `groups` valid for an hour.
pub fn sign_in(ca: &Ca, dir: &Path, name: &str, groups: &[&str], ttl: &str) -> Person {
    let id = format!("spiffe://mayfly.local/user/{name}");
    let minted = dir.join(format!("{name}-svid"));
    let o = Command::new(bin("mayfly-ca"))
        .args(["svid", "mint", "--data-dir"])
        .arg(&ca.dir)
        .args(["--spiffe-id", &id, "--ttl", ttl, "--json", "--out"])
        .arg(&minted)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let read = |f: &str| std::fs::read_to_string(minted.join(f)).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let config_dir = dir.join(format!("{name}-config"));
    creds::save(
        &config_dir,
        &Credentials {
            control_plane: ca.addr.clone(),
            trust_domain: "mayfly.local".into(),
            spiffe_id: id.clone(),
            cert_chain_pem: read("svid.pem"),
            key_pem: read("svid.key"),
            bundle_pem: read("bundle.pem"),
            not_after: info["not_after"].as_i64().unwrap(),
            issuer: "https://idp.test".into(),
            sign_in_expires: now + 3600,
        },
    )
    .unwrap();
    let store = mayfly_ca::server::store::open(
        &StoreUrl::Sqlite(ca.dir.join(mayfly_ca::server::datadir::DB_FILE)),
        None,
    )
    .unwrap();
    store
        .put_user_session(&UserSession {
            spiffe_id: id.clone(),
            issuer: "https://idp.test".into(),
            subject: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            signed_in_at: now,
            expires_at: now + 3600,
        })
        .unwrap();
    Person { id, config_dir }
}

impl Person {
    /// `mayfly ARGS` as this person.
    pub fn mayfly(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// `mayfly ARGS` as this person: (success, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String, String) {
        let o = self.mayfly(args);
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// The `mayfly` command with this person's configuration directory.
    pub fn command(&self) -> Command {
        let mut c = Command::new(bin("mayfly"));
        c.env("MAYFLY_CONFIG_DIR", &self.config_dir);
        c
    }
}
