//! The key-encryption key (KEK) that seals CA private keys in a shared database: 32 random
//! bytes, hex in a 0600 file that each replica reads (`--kek-file`). A key is sealed with
//! AES-256-GCM under a fresh random nonce, the authority's identity as associated data, so a
//! sealed key cannot be moved to another authority's row. The KEK itself is never logged and
//! never part of an error.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

/// The first byte of a sealed key: the format (AES-256-GCM, 12-byte nonce, tag appended).
const SEALED_V1: u8 = 1;

/// Why a KEK file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KekError {
    /// The file cannot be read or created.
    #[error("key-encryption key {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// There is no file at the path.
    #[error(
        "key-encryption key {0} does not exist: copy the one `mayfly-ca init` created (every replica needs the same) or give its path with --kek-file"
    )]
    Missing(PathBuf),
    /// Group or others may access the file.
    #[error(
        "key-encryption key {path} is accessible by group or others (mode {mode:o}): run `chmod 600 {path}`"
    )]
    Permissive {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The file does not hold 64 hex digits.
    #[error("key-encryption key {0} is malformed: expected 64 hex digits (32 bytes)")]
    Malformed(PathBuf),
}

/// Why a sealed key did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the key-encryption key does not open (or cannot seal) the key")]
pub struct Unsealable;

/// A key-encryption key.
pub struct Kek(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// A new random key.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        crate::identity::keys::fill_random(k.as_mut());
        Self(k)
    }

    /// Reads a KEK file, refusing one that group or others may access.
    pub fn load(path: &Path) -> Result<Self, KekError> {
        let io = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::NotFound {
                KekError::Missing(path.to_path_buf())
            } else {
                KekError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KekError::Permissive {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = Zeroizing::new(fs::read_to_string(path).map_err(io)?);
        let mut k = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), k.as_mut())
            .map_err(|_| KekError::Malformed(path.to_path_buf()))?;
        Ok(Self(k))
    }

    /// Reads the KEK file, or creates it (0600, never briefly wider) with a new random key
    /// when there is none. True when it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KekError> {
        let kek = Self::generate();
        let text = Zeroizing::new(format!("{}\n", hex::encode(kek.0.as_ref())));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => {
                let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
                if let Err(source) = written {
                    let _ = fs::remove_file(path);
                    return Err(KekError::Io {
                        path: path.to_path_buf(),
                        source,
                    });
                }
                Ok((kek, true))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok((Self::load(path)?, false))
            }
            Err(source) => Err(KekError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn key(&self) -> LessSafeKey {
        // 32 bytes is AES-256's key length: UnboundKey::new cannot refuse it.
        #[allow(clippy::expect_used)]
        let k = UnboundKey::new(&AES_256_GCM, self.0.as_ref()).expect("a 32-byte AES-256 key");
        LessSafeKey::new(k)
    }

    /// Seals `plain` with `aad` bound to it: version byte, nonce, ciphertext and tag.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, Unsealable> {
        let mut nonce = [0u8; NONCE_LEN];
        crate::identity::keys::fill_random(&mut nonce);
        let mut body = Zeroizing::new(plain.to_vec());
        // Sealing fails only for inputs over GCM's 64 GiB limit, never for a key.
        self.key()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut *body,
            )
            .map_err(|_| Unsealable)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + body.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens what [`Kek::seal`] sealed with the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Unsealable> {
        let [SEALED_V1, rest @ ..] = sealed else {
            return Err(Unsealable);
        };
        if rest.len() < NONCE_LEN {
            return Err(Unsealable);
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Unsealable)?;
        let mut buf = Zeroizing::new(body.to_vec());
        let n = self
            .key()
            .open_in_place(nonce, Aad::from(aad), buf.as_mut_slice())
            .map_err(|_| Unsealable)?
            .len();
        buf.truncate(n);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_sealed_key_opens_only_with_its_kek_and_its_identity() {
        let kek = Kek::generate();
        let sealed = kek.seal(b"authority a", b"secret pkcs8").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            kek.open(b"authority a", &sealed).unwrap().as_slice(),
            b"secret pkcs8"
        );
        assert_eq!(kek.open(b"authority b", &sealed), Err(Unsealable));
        assert_eq!(
            Kek::generate().open(b"authority a", &sealed),
            Err(Unsealable)
        );
        assert_ne!(
            kek.seal(b"authority a", b"secret pkcs8").unwrap(),
            sealed,
            "nonce reused"
        );
    }

    #[test]
    fn a_kek_file_is_created_private_and_refused_when_others_can_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let (a, created) = Kek::load_or_create(&path).unwrap();
        assert!(created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = Kek::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.0.as_ref(), b.0.as_ref());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let e = Kek::load(&path).unwrap_err();
        assert!(matches!(e, KekError::Permissive { .. }), "{e}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "not hex").unwrap();
        assert!(matches!(Kek::load(&path), Err(KekError::Malformed(_))));
        assert!(!format!("{a:?}").contains(&hex::encode(a.0.as_ref())));
    }
}
