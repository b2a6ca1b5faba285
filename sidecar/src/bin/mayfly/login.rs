//! `mayfly login`, `logout`, `status`: a person signs in with the identity provider the control
//! plane trusts and gets a user SVID for a key made on this machine.
//!
//! By default the OAuth 2.0 Device Authorization Grant (RFC 8628): the URL and code are printed,
//! the person opens the URL anywhere, and this command polls the token endpoint. With
//! `--browser`, the authorization code flow with PKCE (S256) on a loopback redirect
//! (`http://127.0.0.1:<random port>/callback`, `state` and `nonce` checked). Either way the ID
//! token goes to the control plane (`POST /v1/user/svid`) with a CSR; the SVID, its key and the
//! trust bundle are written 0600 to the credentials file (`sidecar::user::creds`). The key is
//! never sent or logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use arc_swap::ArcSwap;
use clap::Args;
use mayfly_ca::identity::bundle::{BundleSet, TrustBundle};
use mayfly_ca::identity::client::CaClient;
use mayfly_ca::identity::id::{TrustDomain, parse_trust_domain, user_id};
use mayfly_ca::identity::keys::{SecretKey, pem_encode};
use mayfly_ca::identity::oidc::{Discovery, HttpClient, Url, unverified_claims};
use mayfly_ca::identity::verify::SharedBundles;
use mayfly_sidecar::user::creds::{self, Credentials};

mod flows;

#[derive(Args)]
pub(crate) struct LoginArgs {
    /// The control plane's API address (host:port; several, comma-separated, for replicas).
    #[arg(long, env = "MAYFLY_CONTROL_PLANE")]
    control_plane: String,
    /// The trust bundle, PEM (`mayfly-ca bundle show --format pem`, handed out by your
    /// administrator like a cluster CA): how this machine recognises the control plane.
    #[arg(long, env = "MAYFLY_BUNDLE")]
    bundle: PathBuf,
    /// The trust domain; default: the one the bundle's root names.
    #[arg(long)]
    trust_domain: Option<String>,
    /// The identity provider (issuer URL); default: the only one the control plane lists.
    #[arg(long)]
    issuer: Option<String>,
    /// Sign in in a browser on this machine (authorization code + PKCE on a loopback
    /// redirect) instead of the device flow.
    #[arg(long)]
    browser: bool,
    /// Extra CA certificates (PEM) for the identity provider's https.
    #[arg(long)]
    idp_ca: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct LogoutArgs {}

#[derive(Args)]
pub(crate) struct StatusArgs {}

fn trust_domain(args: &LoginArgs, pem: &str) -> Result<TrustDomain> {
    if let Some(td) = &args.trust_domain {
        return parse_trust_domain(td).context("--trust-domain");
    }
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()).flatten() {
        if let Ok(Some(id)) = mayfly_ca::identity::svid::check_ca(&cert) {
            return Ok(id.trust_domain().clone());
        }
    }
    bail!(
        "{}: no root naming its trust domain; pass --trust-domain",
        args.bundle.display()
    )
}

fn when(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

pub(crate) async fn login(args: LoginArgs) -> Result<()> {
    let pem = std::fs::read_to_string(&args.bundle)
        .with_context(|| format!("--bundle {}", args.bundle.display()))?;
    let td = trust_domain(&args, &pem)?;
    let bundle = TrustBundle::from_pem(td.clone(), &pem)
        .with_context(|| format!("--bundle {}", args.bundle.display()))?;
    let bundles: SharedBundles = Arc::new(ArcSwap::from_pointee(BundleSet::single(bundle)));
    let client = CaClient::new(args.control_plane.clone(), td.clone())?;
    let listed = client
        .oidc_issuers(bundles.clone())
        .await
        .context("cannot ask the control plane which identity provider to use")?;
    let chosen = match &args.issuer {
        Some(i) => listed
            .issuers
            .iter()
            .find(|x| x.issuer == *i)
            .ok_or_else(|| anyhow!("the control plane does not trust the issuer {i}"))?,
        None => match listed.issuers.as_slice() {
            [] => bail!("sign-in is not enabled on this control plane (no --oidc-issuer)"),
            [one] => one,
            many => bail!(
                "the control plane trusts several identity providers; choose one with --issuer: {}",
                many.iter()
                    .map(|x| x.issuer.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    Url::issuer(&chosen.issuer)?;
    let http = HttpClient::new(args.idp_ca.as_deref())?;
    let discovery: Discovery = http
        .get_json(&Url::discovery(&chosen.issuer)?.text)
        .await
        .context("cannot read the identity provider's discovery document")?;
    if discovery.issuer != chosen.issuer {
        bail!(
            "the discovery document names the issuer {:?}, not {:?}",
            discovery.issuer,
            chosen.issuer
        );
    }
    let (id_token, nonce) = if args.browser {
        let (t, n) = flows::browser(&http, &discovery, &chosen.client_id).await?;
        (t, Some(n))
    } else {
        (
            flows::device(&http, &discovery, &chosen.client_id).await?,
            None,
        )
    };
    let claims = unverified_claims(&id_token)
        .ok_or_else(|| anyhow!("the identity provider's ID token cannot be read"))?;
    let name = claims
        .get(&chosen.user_claim)
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("the ID token has no {} claim", chosen.user_claim))?;
    let id = user_id(&td, name)?;
    let key = SecretKey::generate()?;
    let svid = client
        .user_svid(bundles, &id_token, nonce.as_deref(), &key, &id)
        .await
        .context("the control plane refused the sign-in")?;
    let creds = Credentials {
        control_plane: args.control_plane.clone(),
        trust_domain: td.to_string(),
        spiffe_id: svid.spiffe_id.clone(),
        cert_chain_pem: svid
            .chain
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect(),
        key_pem: key.to_pem().to_string(),
        bundle_pem: svid.bundle.to_pem(),
        not_after: svid.not_after,
        issuer: svid.issuer.clone(),
        sign_in_expires: svid.sign_in_expires,
    };
    let path = creds::save(&creds::config_dir()?, &creds)?;
    eprintln!(
        "Signed in as {} until {} (sign-in valid until {}); credentials in {}",
        svid.spiffe_id,
        when(svid.not_after),
        when(svid.sign_in_expires),
        path.display()
    );
    Ok(())
}

pub(crate) async fn logout(_: LogoutArgs) -> Result<()> {
    let dir = creds::config_dir()?;
    if creds::remove(&dir)? {
        eprintln!("Signed out: removed {}", dir.join(creds::FILE).display());
    } else {
        eprintln!("Not signed in.");
    }
    Ok(())
}

pub(crate) async fn status(_: StatusArgs) -> Result<()> {
    let c = creds::load(&creds::config_dir()?)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let state = |t: i64| if t > now { "" } else { " (expired)" };
    println!("{}", c.spiffe_id);
    println!("  SVID until {}{}", when(c.not_after), state(c.not_after));
    println!(
        "  sign-in with {} until {}{}",
        c.issuer,
        when(c.sign_in_expires),
        state(c.sign_in_expires)
    );
    println!("  control plane {}", c.control_plane);
    Ok(())
}

/// How long a flow waits for the person at most, whatever the provider says.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(15 * 60);
