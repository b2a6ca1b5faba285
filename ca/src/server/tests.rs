//! The control plane when its store fails: unit tests on a real (SQLite) store, wrapped where a
//! failure has to be injected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use time::OffsetDateTime;

use super::ca::{Ca, CaSettings, Caller};
use super::distribution::Distribution;
use crate::authority::{Authorities, AuthorityConfig};
use crate::id::{parse_trust_domain, parse_workload_id};
use crate::issue::make_csr;
use crate::keys::SecretKey;
use crate::store::Store;
use crate::store::faulty::FaultyStore;

const WEB: &str = "spiffe://mayfly.local/web";

fn ca_on(store: Arc<dyn Store>) -> Arc<Ca> {
    let td = parse_trust_domain("mayfly.local").unwrap();
    let a = Authorities::init(td, AuthorityConfig::default(), OffsetDateTime::now_utc()).unwrap();
    store.save_authorities(&a).unwrap();
    store.set_setting("trust_domain", "mayfly.local").unwrap();
    Ca::start(
        store,
        a,
        CaSettings::default(),
        Distribution::new(None).unwrap(),
    )
    .unwrap()
}

fn csr(id: &str) -> Vec<u8> {
    make_csr(
        &SecretKey::generate().unwrap(),
        &parse_workload_id(id).unwrap(),
    )
    .unwrap()
}

#[test]
fn a_token_stays_unspent_when_its_svid_cannot_be_logged() {
    let store = Arc::new(FaultyStore::in_memory());
    let ca = ca_on(store.clone());
    let (token, _) = ca
        .create_token(WEB, Duration::from_secs(600), "root")
        .unwrap();
    let text = token.reveal().to_string();
    store.fail_issued_log.store(true, Ordering::SeqCst);
    let err = ca
        .issue_svid(&csr(WEB), Caller::Token(text.clone()), None, "test")
        .unwrap_err();
    assert_eq!(err.status(), 500, "{err}");
    assert_eq!(store.list_tokens().unwrap()[0].used_at, None, "spent");
    store.fail_issued_log.store(false, Ordering::SeqCst);
    let issued = ca
        .issue_svid(&csr(WEB), Caller::Token(text.clone()), None, "test")
        .expect("the token survived the failed issuance");
    assert_eq!(issued.id.to_string(), WEB);
    let again = ca
        .issue_svid(&csr(WEB), Caller::Token(text), None, "test")
        .unwrap_err();
    assert_eq!(again.reason(), "token_used");
}
