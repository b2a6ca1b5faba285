//! The data directory: where the store lives, with permissions checked before anything starts.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The database file inside the data directory.
pub const DB_FILE: &str = "ca.db";
/// The admin socket inside the data directory.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Group or others can read the directory or a secret file.
    #[error(
        "{path} is accessible by group or others (mode {mode:o}): it holds CA private keys; run `chmod {want:o} {path}`"
    )]
    Permissive {
        /// The path.
        path: PathBuf,
        /// Its mode.
        mode: u32,
        /// The mode it should have.
        want: u32,
    },
    /// `init` on a directory that already holds a CA.
    #[error("{0} already holds a mayfly CA: refusing to overwrite it")]
    AlreadyInitialised(PathBuf),
    /// No CA in the directory.
    #[error("{0} holds no mayfly CA: run `mayfly-ca init --data-dir {0} --trust-domain TD` first")]
    NotInitialised(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A checked data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Starts `init`: creates the directory (0700) if missing and an empty database file (0600)
    /// under a temporary name. The CA exists only once [`PendingDataDir::commit`] gives that
    /// file its name; until then a failed `init` leaves nothing behind.
    pub fn create(root: &Path) -> Result<PendingDataDir, DataDirError> {
        let created_root = !root.exists();
        if created_root {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(io(root))?;
        }
        let mut pending = PendingDataDir {
            dir: Self {
                root: root.to_path_buf(),
            },
            tmp_db: root.join(format!("{DB_FILE}.init-{}", std::process::id())),
            created_root,
            committed: false,
        };
        if pending.dir.db_path().exists() {
            // Not ours to remove: keep the directory as it was.
            pending.created_root = false;
            return Err(DataDirError::AlreadyInitialised(root.to_path_buf()));
        }
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io(root))?;
        let tmp = pending.tmp_db.clone();
        let _ = fs::remove_file(&tmp);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        Ok(pending)
    }

    /// Opens an existing directory, refusing one whose secrets others could read.
    pub fn open(root: &Path) -> Result<Self, DataDirError> {
        let dir = Self {
            root: root.to_path_buf(),
        };
        if !dir.db_path().exists() {
            return Err(DataDirError::NotInitialised(root.to_path_buf()));
        }
        check_mode(root, 0o700)?;
        for name in [DB_FILE, "ca.db-wal", "ca.db-shm"] {
            let p = root.join(name);
            if p.exists() {
                check_mode(&p, 0o600)?;
            }
        }
        Ok(dir)
    }

    /// A data directory whose store is elsewhere (`--store`): created (0700) if missing,
    /// refused if others can enter it. It holds the admin socket and, by default, the KEK.
    pub fn ensure(root: &Path) -> Result<Self, DataDirError> {
        if !root.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(io(root))?;
        }
        check_mode(root, 0o700)?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The database file.
    pub fn db_path(&self) -> PathBuf {
        self.root.join(DB_FILE)
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join(ADMIN_SOCKET)
    }
}

/// A data directory that `init` is filling: see [`DataDir::create`]. Dropped without
/// [`commit`](Self::commit), it removes its temporary database, and the directory itself if
/// `init` created it.
#[derive(Debug)]
pub struct PendingDataDir {
    dir: DataDir,
    tmp_db: PathBuf,
    created_root: bool,
    committed: bool,
}

impl PendingDataDir {
    /// The database file to build (the temporary name). Close it before [`Self::commit`].
    pub fn db_path(&self) -> &Path {
        &self.tmp_db
    }

    /// Gives the database its name: from now on the directory holds a CA. A database that
    /// appeared meanwhile (another `init`) is never overwritten.
    pub fn commit(mut self) -> Result<DataDir, DataDirError> {
        let db = self.dir.db_path();
        match fs::hard_link(&self.tmp_db, &db) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(DataDirError::AlreadyInitialised(self.dir.root.clone()));
            }
            // A filesystem without hard links: the existence check above is the guard.
            Err(_) if !db.exists() => fs::rename(&self.tmp_db, &db).map_err(io(&db))?,
            Err(e) => return Err(io(&db)(e)),
        }
        self.committed = true;
        let _ = fs::remove_file(&self.tmp_db);
        // The new name must survive a crash.
        if let Ok(d) = fs::File::open(&self.dir.root) {
            let _ = d.sync_all();
        }
        Ok(self.dir.clone())
    }
}

impl Drop for PendingDataDir {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut p = self.tmp_db.clone().into_os_string();
            p.push(suffix);
            let _ = fs::remove_file(p);
        }
        if self.created_root {
            // Only if empty: never remove what someone else put there.
            let _ = fs::remove_dir(&self.dir.root);
        }
    }
}

fn check_mode(path: &Path, want: u32) -> Result<(), DataDirError> {
    let mode = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(DataDirError::Permissive {
            path: path.to_path_buf(),
            mode,
            want,
        });
    }
    Ok(())
}

/// Writes a file holding a secret: created 0600 (never briefly wider), replacing any old file.
pub fn write_secret(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}
