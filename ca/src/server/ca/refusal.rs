//! Who asks for an SVID, and why a request is refused (with the HTTP status and the short
//! reason each refusal maps to).

use crate::identity::signing::issue::IssueError;
use crate::identity::svid::SvidInfo;
use crate::server::store::{StoreError, TokenRefusal};

/// Who is asking for an SVID.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A join token (bootstrap).
    Token(String),
    /// An mTLS peer with a verified, unexpired SVID (renewal).
    Svid(SvidInfo),
    /// A Kubernetes projected service-account token (bootstrap by attestation).
    K8s(String),
    /// Nobody we can authenticate.
    Anonymous,
}

/// Why an SVID request was refused, with the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No token and no client certificate.
    #[error("authentication required: send a join token, or connect with your current SVID")]
    Unauthenticated,
    /// The token is not acceptable.
    #[error(transparent)]
    Token(#[from] TokenRefusal),
    /// The token is not even well-formed.
    #[error("{0}")]
    TokenFormat(String),
    /// A peer from another trust domain tried to renew.
    #[error("SVID {0} is not of this trust domain")]
    ForeignPeer(String),
    /// The CSR is not acceptable.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// The store failed (an unwritable one says so: `store cannot write: ...`).
    #[error("{}", store_refusal(.0))]
    Store(#[from] StoreError),
    /// Another replica kept rotating the authorities while this one tried.
    #[error("the CA authorities kept changing under concurrent rotations; retrying")]
    RotationContended,
    /// The Kubernetes service-account token is not acceptable.
    #[error(transparent)]
    K8s(#[from] crate::server::attest::AttestError),
    /// A JWT-SVID cannot be minted as asked.
    #[error(transparent)]
    Jwt(#[from] crate::identity::jwt::JwtError),
    /// A sign-in is not acceptable.
    #[error(transparent)]
    SignIn(#[from] crate::server::oidc::SignInError),
    /// A person's identity asked for something only workloads do (renewal, a join token).
    #[error(
        "{0} is a person's identity: it is obtained only by signing in (mayfly login), never renewed or bootstrapped"
    )]
    UserNamespace(String),
}

impl Refusal {
    /// HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Unauthenticated
            | Refusal::Token(_)
            | Refusal::TokenFormat(_)
            | Refusal::K8s(_) => 401,
            Refusal::Jwt(crate::identity::jwt::JwtError::Audience(_)) => 400,
            Refusal::Jwt(_) => 500,
            Refusal::ForeignPeer(_) | Refusal::UserNamespace(_) => 403,
            Refusal::SignIn(e) => e.status(),
            Refusal::Issue(
                IssueError::WrongId { .. }
                | IssueError::Reserved(_)
                | IssueError::BadId(crate::identity::id::IdError::Reserved(_)),
            ) => 403,
            Refusal::Issue(IssueError::CsrTooLarge(_)) => 413,
            // The database is down or full: nothing was spent or logged, try again later.
            Refusal::Store(StoreError::Unwritable(_)) => 503,
            Refusal::Issue(
                IssueError::NoSigner | IssueError::SignerExpired(_) | IssueError::Sign(_),
            )
            | Refusal::Store(_)
            | Refusal::RotationContended => 500,
            Refusal::Issue(_) => 400,
        }
    }

    /// Short reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::Token(t) => t.reason(),
            Refusal::TokenFormat(_) => "token_malformed",
            Refusal::ForeignPeer(_) => "foreign_peer",
            Refusal::Issue(e) => e.reason(),
            Refusal::Store(StoreError::Unwritable(_)) => "store_unavailable",
            Refusal::Store(_) | Refusal::RotationContended => "internal",
            Refusal::K8s(e) => e.reason(),
            Refusal::SignIn(e) => e.reason(),
            Refusal::UserNamespace(_) => "user_namespace",
            Refusal::Jwt(crate::identity::jwt::JwtError::Audience(_)) => "bad_audience",
            Refusal::Jwt(_) => "internal",
        }
    }
}

fn store_refusal(e: &StoreError) -> String {
    match e {
        StoreError::Unwritable(_) => e.to_string(),
        other => format!("internal error: {other}"),
    }
}
