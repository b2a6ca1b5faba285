//! What the `mayfly` user CLI shares between its commands: the credentials a person's sign-in
//! leaves behind ([`creds`]) and the TLS identity they make ([`tls`]).

pub mod creds;
pub mod tls;
