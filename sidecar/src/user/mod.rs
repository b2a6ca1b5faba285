//! What the `mayfly` user CLI shares between its commands: the credentials a person's sign-in
//! leaves behind ([`creds`]).

pub mod creds;
