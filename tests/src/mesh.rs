//! The mesh most end-to-end tests need: a control plane, `orders`' sidecar in front of an app,
//! and `web`'s sidecar with an outbound to it, allowed by a `web -> orders` policy; in TCP mode
//! ([`Pair::tcp`], a TCP echo app) or HTTP mode ([`Pair::http`], [`http_app`]). What the tests
//! vary (the policies, the app and how it speaks, the control plane's flags and address, TOML
//! for both sidecars) are the [`PairBuilder`]'s options.

use std::path::PathBuf;
use std::sync::Arc;

use crate::{Ca, Sidecar, Spec, echo_app, free_port, http_app, policy};

/// A running two-sidecar mesh.
pub struct Pair {
    /// The temporary directory everything lives in.
    pub tmp: Arc<tempfile::TempDir>,
    /// The control plane.
    pub ca: Ca,
    /// Its address (the same after a restart with [`Ca::run`] when started with
    /// [`PairBuilder::fixed_port`]).
    pub port: String,
    /// The calling sidecar.
    pub web: Sidecar,
    /// The called sidecar.
    pub orders: Sidecar,
    /// `web`'s outbound listener for `orders` (plaintext).
    pub out: String,
    /// The same as a URL, `http://<out>`.
    pub url: String,
    /// `orders`' inbound listener (mTLS).
    pub inbound: String,
    /// `orders`' policy file.
    pub orders_policy: PathBuf,
    /// `web`'s policy file (`orders`' unless [`PairBuilder::web_policy`] gave it its own).
    pub web_policy: PathBuf,
    /// `orders`' join token file.
    pub orders_token: PathBuf,
    /// `web`'s join token file.
    pub web_token: PathBuf,
    /// `<tmp>/tester`: with [`PairBuilder::tester`], an SVID for `spiffe://mayfly.local/tester`
    /// (svid.pem, svid.key, bundle.pem), a client of the test's own.
    pub tester: PathBuf,
}

impl Pair {
    /// A mesh in TCP mode, `orders`' app a TCP echo server with the banner `orders-app`.
    pub fn tcp() -> PairBuilder {
        PairBuilder::new(false)
    }

    /// A mesh in HTTP mode (both sidecars `protocol = "http"`), `orders`' app an [`http_app`]
    /// named `orders`.
    pub fn http() -> PairBuilder {
        PairBuilder::new(true)
    }
}

/// How a [`Pair`] is set up; [`PairBuilder::start`] starts it.
pub struct PairBuilder {
    http: bool,
    policy: String,
    web_policy: Option<String>,
    app: Option<String>,
    app_protocol: Option<String>,
    svid_ttl: Option<String>,
    extra: String,
    ca_flags: Vec<String>,
    ca_follows_policy: bool,
    fixed_port: bool,
    tester: bool,
}

impl PairBuilder {
    fn new(http: bool) -> Self {
        Self {
            http,
            policy: policy(&[("web", "orders")]),
            web_policy: None,
            app: None,
            app_protocol: None,
            svid_ttl: None,
            extra: String::new(),
            ca_flags: Vec::new(),
            ca_follows_policy: false,
            fixed_port: false,
            tester: false,
        }
    }

    /// The policy both sidecars follow (or `orders` alone, with [`PairBuilder::web_policy`]),
    /// instead of `web -> orders` allowed.
    pub fn policy(mut self, toml: &str) -> Self {
        self.policy = toml.to_owned();
        self
    }

    /// A policy file of `web`'s own (its egress policy).
    pub fn web_policy(mut self, toml: &str) -> Self {
        self.web_policy = Some(toml.to_owned());
        self
    }

    /// `orders`' app at `addr` instead of the default one.
    pub fn app(mut self, addr: &str) -> Self {
        self.app = Some(addr.to_owned());
        self
    }

    /// HTTP mode: how `orders`' sidecar speaks to the app (`app_protocol`, such as `http2`).
    pub fn app_protocol(mut self, protocol: &str) -> Self {
        self.app_protocol = Some(protocol.to_owned());
        self
    }

    /// `control_plane.svid_ttl` of both sidecars.
    pub fn svid_ttl(mut self, ttl: &str) -> Self {
        self.svid_ttl = Some(ttl.to_owned());
        self
    }

    /// TOML tables appended to both sidecars' configurations; a `spool_dir = "x"` in them
    /// becomes each sidecar's own (`orders-audit`, `web-audit`).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// Each sidecar's audit spool in a directory of its own (`orders-audit`, `web-audit`).
    pub fn audit_spools(self) -> Self {
        self.extra("[audit]\nspool_dir = \"x\"\n")
    }

    /// Extra `mayfly-ca run` flags, kept for restarts.
    pub fn ca_flags(mut self, flags: &[&str]) -> Self {
        self.ca_flags.extend(flags.iter().map(|f| f.to_string()));
        self
    }

    /// The control plane publishes `orders`' policy file (`--policy`) too.
    pub fn ca_follows_policy(mut self) -> Self {
        self.ca_follows_policy = true;
        self
    }

    /// The control plane on a fixed port, so that it can be killed and brought back at the
    /// same address ([`Pair::port`]).
    pub fn fixed_port(mut self) -> Self {
        self.fixed_port = true;
        self
    }

    /// Mints an SVID for `spiffe://mayfly.local/tester` into [`Pair::tester`].
    pub fn tester(mut self) -> Self {
        self.tester = true;
        self
    }

    /// Starts the control plane and `orders`' sidecar (not waiting for it to be ready), for a
    /// test that starts a `web` of its own.
    pub async fn start_orders(self) -> Orders {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let dir = tmp.path();
        let (orders_policy, web_policy) = match &self.web_policy {
            None => (dir.join("policy.toml"), dir.join("policy.toml")),
            Some(web) => {
                let path = dir.join("web-policy.toml");
                std::fs::write(&path, web).unwrap();
                (dir.join("orders-policy.toml"), path)
            }
        };
        std::fs::write(&orders_policy, &self.policy).unwrap();
        let mut flags: Vec<&str> = self.ca_flags.iter().map(String::as_str).collect();
        if self.ca_follows_policy {
            flags.extend(["--policy", orders_policy.to_str().unwrap()]);
        }
        let mut ca = Ca::start_with(&tmp, &flags);
        if self.fixed_port {
            let port = free_port();
            ca.proc.as_mut().unwrap().stop();
            ca.run(&port);
        }
        let app = match &self.app {
            Some(app) => app.clone(),
            None if self.http => http_app("orders").await,
            None => echo_app("orders-app").await,
        };
        let orders_token = ca.token_file("spiffe://mayfly.local/orders", &dir.join("orders.token"));
        let mut config = self.config(Spec {
            me: "orders",
            ca: &ca.addr,
            token: &orders_token,
            policy: &orders_policy,
            inbound_app: Some(&app),
            outbound: &[],
            svid_ttl: self.svid_ttl.as_deref(),
            extra: &self.extra,
        });
        if self.http {
            let app_protocol = self
                .app_protocol
                .as_ref()
                .map(|p| format!("app_protocol = \"{p}\"\n"))
                .unwrap_or_default();
            config = config.replace(
                "[inbound]\n",
                &format!("[inbound]\nprotocol = \"http\"\n{app_protocol}"),
            );
        }
        let mut orders = Sidecar::start(dir, "orders", &config);
        let inbound = orders.inbound();
        Orders {
            tmp,
            ca,
            orders,
            inbound,
            orders_policy,
            web_policy,
            orders_token,
            setup: self,
        }
    }

    /// Starts the mesh and waits until both sidecars are ready.
    pub async fn start(self) -> Pair {
        self.start_orders().await.start_web().await
    }

    /// `spec`'s configuration, its `spool_dir = "x"` made the sidecar's own.
    fn config(&self, spec: Spec<'_>) -> String {
        spec.toml().replace(
            "spool_dir = \"x\"",
            &format!("spool_dir = \"{}-audit\"", spec.me),
        )
    }
}

/// A control plane and `orders`' sidecar, started by [`PairBuilder::start_orders`].
pub struct Orders {
    /// The temporary directory everything lives in.
    pub tmp: Arc<tempfile::TempDir>,
    /// The control plane.
    pub ca: Ca,
    /// The called sidecar.
    pub orders: Sidecar,
    /// Its inbound listener (mTLS).
    pub inbound: String,
    /// Its policy file.
    pub orders_policy: PathBuf,
    web_policy: PathBuf,
    orders_token: PathBuf,
    setup: PairBuilder,
}

impl Orders {
    /// Starts `web`'s sidecar with an outbound to `orders`, and waits until both are ready.
    async fn start_web(self) -> Pair {
        let Self {
            tmp,
            ca,
            orders,
            inbound,
            orders_policy,
            web_policy,
            orders_token,
            setup,
        } = self;
        let dir = tmp.path();
        let web_token = ca.token_file("spiffe://mayfly.local/web", &dir.join("web.token"));
        let mut config = setup.config(Spec {
            me: "web",
            ca: &ca.addr,
            token: &web_token,
            policy: &web_policy,
            inbound_app: None,
            outbound: &[("orders", &inbound, "orders")],
            svid_ttl: setup.svid_ttl.as_deref(),
            extra: &setup.extra,
        });
        if setup.http {
            config = http_outbound(&config, "orders");
        }
        let mut web = Sidecar::start(dir, "web", &config);
        let out = web.outbound("orders");
        let tester = dir.join("tester");
        if setup.tester {
            ca.mint("spiffe://mayfly.local/tester", &tester);
        }
        orders.wait_ready().await;
        web.wait_ready().await;
        Pair {
            port: ca.addr.clone(),
            tmp,
            ca,
            web,
            orders,
            url: format!("http://{out}"),
            out,
            inbound,
            orders_policy,
            web_policy,
            orders_token,
            web_token,
            tester,
        }
    }
}

/// `config` (a [`Spec::toml`]) with its outbound to `spiffe://mayfly.local/<to>` in HTTP mode.
pub fn http_outbound(config: &str, to: &str) -> String {
    let id = format!("spiffe_id = \"spiffe://mayfly.local/{to}\"\n");
    config.replace(&id, &format!("{id}protocol = \"http\"\n"))
}
