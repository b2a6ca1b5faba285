//! The control plane's addresses and the choice among them: every configured `HOST:PORT`
//! (a name may resolve to several addresses), tried in turn starting with the one that answered
//! last, with one that just failed tried last. Shared by every clone of a [`super::CaClient`],
//! so renewal, the watch stream, audit delivery and registration learn from each other.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::{info, warn};

use super::ClientError;

/// How long connecting to one address (TCP and TLS handshake) may take before the next one is
/// tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One address to dial: the configured entry and what it resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Candidate {
    /// The configured `HOST:PORT`.
    pub(super) entry: String,
    /// One of the addresses it resolves to.
    pub(super) addr: SocketAddr,
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.entry == self.addr.to_string() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{} ({})", self.entry, self.addr)
        }
    }
}

#[derive(Debug, Default)]
struct Choice {
    /// The address that answered last.
    good: Option<SocketAddr>,
    /// An address that failed after answering (a broken stream, a 5xx): tried last.
    suspect: Option<SocketAddr>,
}

/// The addresses of one control plane's replicas.
#[derive(Debug)]
pub(super) struct Replicas {
    entries: Vec<String>,
    choice: Mutex<Choice>,
    failovers: AtomicU64,
}

impl Replicas {
    pub(super) fn new(entries: Vec<String>) -> Result<Self, ClientError> {
        let entries: Vec<String> = entries
            .into_iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if entries.is_empty() {
            return Err(ClientError::NoAddress);
        }
        Ok(Self {
            entries,
            choice: Mutex::new(Choice::default()),
            failovers: AtomicU64::new(0),
        })
    }

    /// The configured entries, comma-separated.
    pub(super) fn shown(&self) -> String {
        self.entries.join(",")
    }

    /// How many entries are configured.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every address to try, in order: the last good one first, then those after it (in
    /// configuration order, wrapping round), a suspect one last. An entry that does not
    /// resolve is reported in the second list.
    pub(super) async fn candidates(&self) -> (Vec<Candidate>, Vec<(String, ClientError)>) {
        let mut all = Vec::new();
        let mut unresolved = Vec::new();
        for entry in &self.entries {
            if let Ok(addr) = entry.parse::<SocketAddr>() {
                all.push(Candidate {
                    entry: entry.clone(),
                    addr,
                });
                continue;
            }
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(entry.as_str()))
                .await
            {
                Ok(Ok(addrs)) => {
                    for addr in addrs {
                        all.push(Candidate {
                            entry: entry.clone(),
                            addr,
                        });
                    }
                }
                Ok(Err(source)) => unresolved.push((
                    entry.clone(),
                    ClientError::Connect {
                        addr: entry.clone(),
                        source,
                    },
                )),
                Err(_) => unresolved.push((entry.clone(), ClientError::Timeout(CONNECT_TIMEOUT))),
            }
        }
        let mut seen = std::collections::HashSet::new();
        all.retain(|c| seen.insert(c.addr));
        let (good, suspect) = match self.choice.lock() {
            Ok(c) => (c.good, c.suspect),
            Err(_) => (None, None),
        };
        if let Some(i) = good.and_then(|g| all.iter().position(|c| c.addr == g)) {
            all.rotate_left(i);
        }
        if let Some(i) = suspect.and_then(|s| all.iter().position(|c| c.addr == s)) {
            let c = all.remove(i);
            all.push(c);
        }
        (all, unresolved)
    }

    /// `c` answered: it is the address in use; a change of address counts as a failover.
    pub(super) fn answered(&self, c: &Candidate) {
        let Ok(mut choice) = self.choice.lock() else {
            return;
        };
        if choice.suspect == Some(c.addr) {
            choice.suspect = None;
        }
        match choice.good.replace(c.addr) {
            Some(before) if before != c.addr => {
                self.failovers.fetch_add(1, Ordering::Relaxed);
                info!(from = %before, to = %c, "control plane: now using another replica");
            }
            _ => {}
        }
    }

    /// `c` failed after it had answered (a stream broke, a 5xx): the next attempt starts with
    /// another address.
    pub(super) fn demote(&self, c: &Candidate, why: &ClientError) {
        if self.entries.len() > 1 || c.entry != c.addr.to_string() {
            warn!(address = %c, error = %why, "control plane replica failed: trying another first");
        }
        if let Ok(mut choice) = self.choice.lock() {
            choice.suspect = Some(c.addr);
        }
    }

    /// The address that answered last.
    pub(super) fn in_use(&self) -> Option<SocketAddr> {
        self.choice.lock().ok().and_then(|c| c.good)
    }

    /// How often the address in use changed.
    pub(super) fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }
}

/// Whether an error from one address is worth trying the next one for: it did not answer,
/// its handshake failed, the exchange broke or it answered with a server error.
pub(super) fn fails_over(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. }
        | ClientError::Tls { .. }
        | ClientError::Timeout(_)
        | ClientError::Http(_) => true,
        ClientError::Refused { status, .. } => *status >= 500,
        _ => false,
    }
}

/// The error when no address answered: the only one's own error, or one naming them all.
pub(super) fn all_failed(mut tried: Vec<(String, ClientError)>) -> ClientError {
    if tried.len() == 1
        && let Some((_, e)) = tried.pop()
    {
        return e;
    }
    ClientError::NoReplica {
        tried: tried.into_iter().map(|(a, e)| (a, Box::new(e))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(r: &Replicas) -> Vec<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (c, unresolved) = rt.block_on(r.candidates());
        assert!(unresolved.is_empty());
        c.into_iter().map(|c| c.addr.to_string()).collect()
    }

    fn at(addr: &str) -> Candidate {
        Candidate {
            entry: addr.into(),
            addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn the_replica_that_answered_last_is_tried_first_and_one_that_failed_last() {
        let r = Replicas::new(vec![
            "127.0.0.1:1".into(),
            " 127.0.0.1:2".into(),
            "127.0.0.1:3".into(),
        ])
        .unwrap();
        assert_eq!(order(&r), ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        r.answered(&at("127.0.0.1:1"));
        assert_eq!(r.failovers(), 0, "a first answer is no failover");
        r.answered(&at("127.0.0.1:2"));
        assert_eq!(r.failovers(), 1);
        assert_eq!(r.in_use(), Some("127.0.0.1:2".parse().unwrap()));
        assert_eq!(order(&r), ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:1"]);
        r.demote(&at("127.0.0.1:2"), &ClientError::Http("reset".into()));
        assert_eq!(order(&r), ["127.0.0.1:3", "127.0.0.1:1", "127.0.0.1:2"]);
        r.answered(&at("127.0.0.1:3"));
        assert_eq!(order(&r), ["127.0.0.1:3", "127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(r.failovers(), 2);
    }

    #[test]
    fn a_name_counts_once_per_address_it_resolves_to_and_is_shown_with_it() {
        let r = Replicas::new(vec!["localhost:1".into(), "127.0.0.1:1".into()]).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (c, unresolved) = rt.block_on(r.candidates());
        assert!(unresolved.is_empty());
        let v4 = c
            .iter()
            .find(|c| c.addr.to_string() == "127.0.0.1:1")
            .unwrap();
        assert_eq!(v4.to_string(), "localhost:1 (127.0.0.1:1)");
        assert_eq!(
            c.iter()
                .filter(|c| c.addr.to_string() == "127.0.0.1:1")
                .count(),
            1,
            "an address listed twice is tried once"
        );
    }

    #[test]
    fn no_address_is_an_error_and_one_failure_keeps_its_own_error() {
        assert!(matches!(
            Replicas::new(vec![" ".into()]),
            Err(ClientError::NoAddress)
        ));
        let one = all_failed(vec![("a:1".into(), ClientError::Http("x".into()))]);
        assert!(matches!(one, ClientError::Http(_)));
        let two = all_failed(vec![
            ("a:1".into(), ClientError::Http("x".into())),
            ("b:2".into(), ClientError::Csr("y".into())),
        ]);
        assert!(two.is_transient(), "one replica may come back");
        let shown = two.to_string();
        assert!(
            shown.contains("a:1: ") && shown.contains("b:2: "),
            "{shown}"
        );
    }
}
