//! The SPIFFE Workload API for the local app (`[workload_api]`): gRPC on a unix socket, as the
//! SPIFFE Workload API specification and its `workload.proto` define it. The app gets an
//! X.509-SVID of the sidecar's own SPIFFE ID with a key of its own ([`app_svid`]), pushed again
//! at every rotation, and the trust bundles; every call is checked against the caller's unix
//! peer credentials ([`service`]). JWT-SVIDs of the same SPIFFE ID are minted by the control
//! plane (at most 5 minutes of life), and validated against the JWT bundles ([`jwt`]).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mayfly_ca::client::CaClient;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tracing::info;

use crate::audit::Auditor;
use crate::config::WorkloadApiConfig;
use crate::identity::Identity;
use crate::metrics::Metrics;

pub mod app_svid;
pub mod authority;
pub mod conn;
pub mod jwt;
pub mod service;

/// The stubs generated from `proto/workload.proto` (server side).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("_");
}

/// Why the Workload API socket could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// Something other than a socket is at the path: it is not ours to remove.
    #[error("workload_api.socket: {0} exists and is not a socket: refusing to replace it")]
    NotASocket(PathBuf),
    /// The path cannot be examined, a stale socket cannot be removed, or the bind failed.
    #[error("workload_api.socket: cannot bind {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Binds the Workload API socket with the configured mode. A socket file left by an earlier
/// run is replaced; anything else at the path is an error.
pub fn bind(cfg: &WorkloadApiConfig) -> Result<UnixListener, BindError> {
    let path = &cfg.socket;
    let io = |source| BindError::Bind {
        path: path.clone(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => return Err(BindError::NotASocket(path.clone())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(cfg.mode)).map_err(io)?;
    Ok(listener)
}

/// What the Workload API needs from the rest of the sidecar.
pub struct Parts {
    /// The sidecar's identity: its SPIFFE ID, SVID (which authenticates the app's SVID
    /// requests) and trust bundles.
    pub identity: Arc<Identity>,
    /// A client of the control plane.
    pub client: CaClient,
    /// The SVID TTL to ask for (the sidecar's own).
    pub ttl: Option<std::time::Duration>,
    /// The audit trail.
    pub audit: Arc<Auditor>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Serves the Workload API on `listener` and keeps the app's SVID, until `shutdown` flips.
pub fn start(
    cfg: WorkloadApiConfig,
    listener: UnixListener,
    parts: Parts,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (tx, rx) = watch::channel(app_svid::Published::default());
    let jwt = Arc::new(jwt::JwtSource::new(
        parts.identity.clone(),
        parts.client.clone(),
    ));
    let maintain = tokio::spawn(app_svid::maintain(
        parts.identity.clone(),
        parts.client,
        parts.ttl,
        tx.clone(),
        shutdown.clone(),
    ));
    let bundles = tokio::spawn(app_svid::follow_bundles(
        parts.identity.clone(),
        tx,
        shutdown.clone(),
    ));
    let socket = cfg.socket.clone();
    let svc = service::WorkloadApi::new(
        Arc::new(cfg),
        rx,
        parts.audit,
        parts.metrics,
        shutdown.clone(),
        jwt,
    );
    let serve = tokio::spawn(serve(svc, listener, socket, shutdown));
    vec![maintain, bundles, serve]
}

async fn serve(
    svc: service::WorkloadApi,
    listener: UnixListener,
    socket: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    info!(socket = %socket.display(), "mayfly-sidecar workload_api on {}", socket.display());
    let incoming = conn::incoming(listener, shutdown.clone());
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    let r = tonic::transport::Server::builder()
        .add_service(pb::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(svc))
        .serve_with_incoming_shutdown(incoming, stop)
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "the Workload API server failed");
    }
    remove_socket(&socket);
}

fn remove_socket(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(socket: PathBuf, mode: u32) -> WorkloadApiConfig {
        WorkloadApiConfig {
            socket,
            mode,
            allowed_uids: vec![0],
            allowed_gids: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_anything_else_at_the_path_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wl.sock");
        let first = bind(&cfg(path.clone(), 0o660)).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o660);
        drop(first);
        // The socket file stays behind, as after a crash: the next start replaces it.
        assert!(path.exists());
        let _second = bind(&cfg(path.clone(), 0o600)).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);

        let file = dir.path().join("data");
        std::fs::write(&file, b"keep me").unwrap();
        let e = bind(&cfg(file.clone(), 0o660)).unwrap_err();
        assert!(matches!(e, BindError::NotASocket(_)), "{e}");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(
            bind(&cfg(sub.clone(), 0o660)),
            Err(BindError::NotASocket(_))
        ));
        assert!(sub.is_dir());
    }
}
