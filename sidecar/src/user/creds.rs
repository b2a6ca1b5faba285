//! A person's credentials between `mayfly` commands: the user SVID (minutes of life), its
//! private key (generated on this machine, never sent anywhere), the trust bundle and the
//! control plane they came from. Kept like `kubectl` and `tsh` keep theirs: one file, 0600, in
//! a 0700 directory under the user's configuration directory
//! (`$MAYFLY_CONFIG_DIR`, else `$XDG_CONFIG_HOME/mayfly`, else `~/.config/mayfly`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file, inside the configuration directory.
pub const FILE: &str = "credentials.json";

/// Why credentials could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredsError {
    /// No configuration directory can be found.
    #[error("no configuration directory: set MAYFLY_CONFIG_DIR, XDG_CONFIG_HOME or HOME")]
    NoDir,
    /// Nobody has signed in on this machine (or `mayfly logout` ran).
    #[error("not signed in ({0} does not exist): run `mayfly login`")]
    NotSignedIn(PathBuf),
    /// The file is readable by others than its owner: refused, like ssh refuses such keys.
    #[error("{0} is readable by group or others (mode {1:o}): chmod 600 it or sign in again")]
    TooOpen(PathBuf, u32),
    /// Reading or writing failed.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The file is not credentials this version can read.
    #[error("{0} is not valid credentials: {1}")]
    Invalid(PathBuf, String),
}

/// What a sign-in leaves on disk.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// The control plane's API address (`host:port`) the SVID came from.
    pub control_plane: String,
    /// The trust domain.
    pub trust_domain: String,
    /// The user SVID's SPIFFE ID (`spiffe://<td>/user/...`).
    pub spiffe_id: String,
    /// The user SVID and its intermediates, PEM, leaf first.
    pub cert_chain_pem: String,
    /// The SVID's private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The trust bundle's X.509 authorities, PEM.
    pub bundle_pem: String,
    /// When the SVID expires (Unix seconds).
    pub not_after: i64,
    /// The identity provider signed in with (`iss`).
    pub issuer: String,
    /// When the sign-in itself expires (Unix seconds): past it, only `mayfly login` renews.
    pub sign_in_expires: i64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Credentials")
            .field("control_plane", &self.control_plane)
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .field("issuer", &self.issuer)
            .field("sign_in_expires", &self.sign_in_expires)
            .finish_non_exhaustive()
    }
}

/// The configuration directory.
pub fn config_dir() -> Result<PathBuf, CredsError> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("MAYFLY_CONFIG_DIR") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = var("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(d).join("mayfly"));
    }
    var("HOME")
        .map(|h| PathBuf::from(h).join(".config").join("mayfly"))
        .ok_or(CredsError::NoDir)
}

/// Writes `creds` to `dir` (created 0700), the file 0600, replaced atomically.
pub fn save(dir: &Path, creds: &Credentials) -> Result<PathBuf, CredsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CredsError::Io(dir.to_owned(), e))?;
    let path = dir.join(FILE);
    let tmp = dir.join(format!(".{FILE}.{}", std::process::id()));
    let body = serde_json::to_vec_pretty(creds)
        .map_err(|e| CredsError::Invalid(path.clone(), e.to_string()))?;
    let write = || -> std::io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        CredsError::Io(path.clone(), e)
    })?;
    Ok(path)
}

/// Reads the credentials in `dir`; refuses a file others can read.
pub fn load(dir: &Path) -> Result<Credentials, CredsError> {
    let path = dir.join(FILE);
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CredsError::NotSignedIn(path));
        }
        Err(e) => return Err(CredsError::Io(path, e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredsError::TooOpen(path, mode));
    }
    let body = fs::read(&path).map_err(|e| CredsError::Io(path.clone(), e))?;
    serde_json::from_slice(&body).map_err(|e| CredsError::Invalid(path, e.to_string()))
}

/// Removes the credentials in `dir`; whether there were any.
pub fn remove(dir: &Path) -> Result<bool, CredsError> {
    let path = dir.join(FILE);
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(CredsError::Io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> Credentials {
        Credentials {
            control_plane: "127.0.0.1:8443".into(),
            trust_domain: "mayfly.local".into(),
            spiffe_id: "spiffe://mayfly.local/user/alice".into(),
            cert_chain_pem: "-----BEGIN CERTIFICATE-----\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nsecret\n".into(),
            bundle_pem: String::new(),
            not_after: 10,
            issuer: "https://idp.example".into(),
            sign_in_expires: 20,
        }
    }

    #[test]
    fn credentials_round_trip_in_a_private_file_and_the_key_is_never_debug_printed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("mayfly");
        let path = save(&d, &sample()).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let back = load(&d).unwrap();
        assert_eq!(back.spiffe_id, sample().spiffe_id);
        assert!(!format!("{back:?}").contains("secret"));
        assert!(remove(&d).unwrap());
        assert!(matches!(load(&d), Err(CredsError::NotSignedIn(_))));
    }

    #[test]
    fn credentials_others_can_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = save(dir.path(), &sample()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(CredsError::TooOpen(_, 0o644))
        ));
    }
}
