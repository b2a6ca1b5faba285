//! The smallest mesh most end-to-end tests need: a control plane on a fixed port (so it can be
//! killed and brought back at the same address), a TCP echo app behind `orders`' sidecar, and
//! `web`'s sidecar with an outbound to it, both allowed by a `web -> orders` policy.

use std::path::PathBuf;
use std::sync::Arc;

use crate::{Ca, Sidecar, Spec, echo_app, free_port, policy};

/// A running two-sidecar TCP mesh.
pub struct TcpPair {
    /// The temporary directory everything lives in.
    pub tmp: Arc<tempfile::TempDir>,
    /// The control plane.
    pub ca: Ca,
    /// Its fixed address.
    pub port: String,
    /// The calling sidecar.
    pub web: Sidecar,
    /// The called sidecar.
    pub orders: Sidecar,
    /// `web`'s outbound listener for `orders`.
    pub out: String,
    /// `orders`' join token file.
    pub orders_token: PathBuf,
    /// `web`'s join token file.
    pub web_token: PathBuf,
}

/// Starts a [`TcpPair`]; `svid_ttl` and `extra` (TOML appended to both configs; a
/// `spool_dir = "x"` in it becomes each sidecar's own) as in [`Spec`].
pub async fn tcp_pair(svid_ttl: Option<&str>, extra: &str) -> TcpPair {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let mut ca = Ca::start(&tmp);
    let port = free_port();
    ca.proc.as_mut().unwrap().stop();
    ca.run(&port);
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let app = echo_app("orders-app").await;
    let orders_token = ca.token_file("spiffe://mayfly.local/orders", &dir.join("orders.token"));
    let mut orders = Sidecar::start(
        dir,
        "orders",
        &Spec {
            me: "orders",
            ca: &port,
            token: &orders_token,
            policy: &pol,
            inbound_app: Some(&app),
            outbound: &[],
            svid_ttl,
            extra,
        }
        .toml()
        .replace("spool_dir = \"x\"", "spool_dir = \"orders-audit\""),
    );
    let inbound = orders.inbound();
    let web_token = ca.token_file("spiffe://mayfly.local/web", &dir.join("web.token"));
    let mut web = Sidecar::start(
        dir,
        "web",
        &Spec {
            me: "web",
            ca: &port,
            token: &web_token,
            policy: &pol,
            inbound_app: None,
            outbound: &[("orders", &inbound, "orders")],
            svid_ttl,
            extra,
        }
        .toml()
        .replace("spool_dir = \"x\"", "spool_dir = \"web-audit\""),
    );
    let out = web.outbound("orders");
    orders.wait_ready().await;
    web.wait_ready().await;
    TcpPair {
        tmp,
        ca,
        port,
        web,
        orders,
        out,
        orders_token,
        web_token,
    }
}
