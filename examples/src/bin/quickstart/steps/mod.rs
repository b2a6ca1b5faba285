//! The narrated tour: each step drives real traffic through the mesh and records what it saw.
//! `setup`: steps 1-3 (control plane, services, policy); `traffic`: steps 4, 6 and 7 (allowed
//! and denied calls); `replicas`: step 5 (two replicas of orders, one killed); `lifecycle`:
//! step 8 (rotation), step 10 (audit) and the summary; `grant`: step 9 (a just-in-time grant,
//! from request to expiry); `people`: step 11 (a person signs in with the local identity
//! provider and reaches db for a minute through another person's approval).

mod grant;
mod lifecycle;
mod people;
mod replicas;
mod setup;
mod traffic;

pub(crate) use grant::grant;
pub(crate) use lifecycle::{audit_trail, rotation, summary};
pub(crate) use people::{person, start_idp};
pub(crate) use replicas::replicas;
pub(crate) use setup::{control_plane, policy, services};
pub(crate) use traffic::{web_post, web_to_db, web_to_orders};

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use base64::Engine as _;
use mayfly_examples::{web, xfcc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::mesh::{SidecarAddrs, id};
use crate::report::Outcome;

/// The policies, as in `examples/policies/`.
const POLICY_HTTP: &str = include_str!("../../../../policies/quickstart-http.toml");
const POLICY_TCP: &str = include_str!("../../../../policies/quickstart-tcp.toml");

/// Numbered steps in the narration.
pub(crate) const STEPS: usize = 11;

/// How the orders hop (web -> orders) is proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    Http,
    Tcp,
}

impl Mode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
        }
    }
}

/// The services and their sidecars, as running.
pub(crate) struct Services {
    pub(crate) mode: Mode,
    pub(crate) web: SidecarAddrs,
    pub(crate) orders: SidecarAddrs,
    pub(crate) db: SidecarAddrs,
    pub(crate) orders_app: String,
    pub(crate) db_app: String,
    /// The policy file the control plane distributes.
    pub(crate) policy: PathBuf,
    /// Its version, as every sidecar reports it.
    pub(crate) policy_version: String,
    /// In TCP mode, why not HTTP, as a phrase ("not available in this build"), and the
    /// outcome to record for steps that need HTTP mode.
    no_http: (String, Outcome),
    svid_ttl: u64,
    tasks: Vec<JoinHandle<()>>,
}

impl Services {
    /// Where web sends requests for orders (its sidecar's outbound port).
    pub(crate) fn web_to_orders(&self) -> &str {
        self.web.outbound.get("orders").map_or("", String::as_str)
    }

    /// The SVID lifetime the sidecars ask for, in seconds.
    pub(crate) fn svid_ttl_secs(&self) -> u64 {
        self.svid_ttl
    }

    /// Where web sends traffic for db (its sidecar's outbound port).
    pub(crate) fn web_to_db(&self) -> &str {
        self.web.outbound.get("db").map_or("", String::as_str)
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The options the tour needs.
pub(crate) struct Opts {
    pub(crate) svid_ttl: Duration,
    /// `None`: HTTP when this build has it, else TCP.
    pub(crate) orders_protocol: Option<Mode>,
}

/// What web's `GET /whoami` showed about HTTP mode.
struct Whoami {
    status: u16,
    xfcc: Vec<String>,
    error: Option<String>,
}

/// A forged identity header web sends, to show the inbound sidecar replaces it.
const FORGED: &str = "By=spiffe://mayfly.local/orders;Hash=00;URI=spiffe://mayfly.local/admin";

async fn whoami(s: &Services, forge: bool) -> Whoami {
    let headers: &[(&str, &str)] = if forge {
        &[(xfcc::HEADER, FORGED)]
    } else {
        &[]
    };
    match web::call(s.web_to_orders(), "GET", "/whoami", headers, None).await {
        Ok(r) => {
            let xfcc = r
                .json()
                .ok()
                .and_then(|v| v.get("x_forwarded_client_cert").cloned())
                .and_then(|v| serde_json::from_value::<Vec<String>>(v).ok())
                .unwrap_or_default();
            Whoami {
                status: r.status,
                xfcc,
                error: (r.status != 200).then(|| format!("HTTP {}: {}", r.status, r.body.trim())),
            }
        }
        Err(e) => Whoami {
            status: 0,
            xfcc: Vec::new(),
            error: Some(format!("{e:#}")),
        },
    }
}

/// True when the header is exactly the one an HTTP-mode orders sidecar sets for web.
fn is_sidecar_xfcc(w: &Whoami) -> bool {
    let [one] = w.xfcc.as_slice() else {
        return false;
    };
    let e = xfcc::parse(one);
    w.status == 200
        && e.by.as_deref() == Some(id("orders").as_str())
        && e.uri.as_deref() == Some(id("web").as_str())
        && e.hash
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// SHA-256 (hex) of the leaf in a sidecar's `/svid` answer.
fn leaf_hash(svid: &Value) -> Option<String> {
    let pem = svid.get("chain_pem")?.as_str()?;
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some(hex::encode(Sha256::digest(&der)))
}

async fn svid(admin: &str) -> anyhow::Result<Value> {
    let r = web::call(admin, "GET", "/svid", &[], None).await?;
    if r.status != 200 {
        bail!("GET /svid answered {}", r.status);
    }
    r.json()
}

fn serial(v: &Value) -> String {
    match v.get("serial") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// The sum of the metric lines of `name` whose labels contain every `labels` entry.
async fn metric(admin: &str, name: &str, labels: &[&str]) -> f64 {
    let Ok(r) = web::call(admin, "GET", "/metrics", &[], None).await else {
        return 0.0;
    };
    r.body
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            let low = l.to_ascii_lowercase();
            labels.iter().all(|x| low.contains(&x.to_ascii_lowercase()))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The endpoints web's sidecar knows for its `orders` outbound (`GET /upstreams`): each one's
/// address and state.
async fn orders_endpoints(admin: &str) -> Vec<(String, String)> {
    let Ok(v) = web::call(admin, "GET", "/upstreams", &[], None)
        .await
        .and_then(|r| r.json())
    else {
        return Vec::new();
    };
    v["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|u| u["name"] == "orders")
        .flat_map(|u| u["endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            (
                e["address"].as_str().unwrap_or("").to_owned(),
                e["state"].as_str().unwrap_or("active").to_owned(),
            )
        })
        .collect()
}

/// Waits (up to 10 s) until web's sidecar knows `n` endpoints of orders.
async fn wait_endpoints(mesh: &crate::mesh::Mesh, admin: &str, n: usize) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = orders_endpoints(admin).await;
        if seen.len() == n {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "web's sidecar knew {} endpoint(s) of orders after 10 s, not {n}:\n{}",
                seen.len(),
                crate::mesh::tail(&mesh.log_of("web sidecar"), 10)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
