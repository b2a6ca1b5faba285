//! End-to-end, the real `mayfly-ca` binary on 127.0.0.1:0: forged token IDs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{CaProc, init_dir};
use mayfly_ca::client::{CaClient, ClientError};
use mayfly_ca::id::{parse_trust_domain, parse_workload_id};
use mayfly_ca::keys::SecretKey;
use mayfly_ca::token::JoinToken;

const WEB: &str = "spiffe://mayfly.local/web";

fn client(ca: &CaProc) -> CaClient {
    CaClient::new(ca.addr.clone(), parse_trust_domain("mayfly.local").unwrap()).unwrap()
}

async fn bootstrap(ca: &CaProc, token: &str) -> Result<(), String> {
    let key = SecretKey::generate().unwrap();
    match client(ca)
        .bootstrap(
            &JoinToken::parse(token).unwrap(),
            &key,
            &parse_workload_id(WEB).unwrap(),
            None,
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(ClientError::Refused { status, reason, .. }) => Err(format!("{status} {reason}")),
        Err(other) => Err(format!("other: {other}")),
    }
}

/// `token` with its `<id>` part replaced.
fn with_id(token: &str, id: &str) -> String {
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[1] = id;
    parts.join(".")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_presented_under_another_id_is_refused_and_spends_nothing() {
    let (_tmp, dir) = init_dir("mayfly.local");
    let ca = CaProc::start(&dir, &[]);
    let a = ca.token(WEB, "10m");
    let b = ca.token(WEB, "10m");
    let b_id = JoinToken::parse(&b).unwrap().id;
    for forged in [with_id(&a, "00000000"), with_id(&a, &b_id)] {
        assert_eq!(
            bootstrap(&ca, &forged).await,
            Err("401 token_unknown".into()),
            "{forged}"
        );
    }
    bootstrap(&ca, &a).await.expect("token a is still unspent");
    bootstrap(&ca, &b).await.expect("token b is still unspent");
}
