//! `db`: a tiny line-based TCP key-value store, the quickstart's database.
//!
//! One command per line, one reply line per command:
//!
//! | command | reply |
//! |---|---|
//! | `GET key` | `VALUE value` or `NONE` |
//! | `SET key value` | `OK` (the value is the rest of the line) |
//! | `INCR key` | `VALUE n` (the key's integer value plus one, 1 if absent) |
//! | `KEYS prefix` | `KEYS k1 k2 ...` (sorted; `KEYS` alone lists every key) |
//! | `PING` | `PONG` |
//!
//! Anything else answers `ERR reason`. Keys have no whitespace; lines are at most 64 KiB.
//! The data lives in memory only.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Longest command line accepted, newline included.
pub const MAX_LINE: usize = 64 * 1024;

/// The key-value map shared by every connection.
#[derive(Debug, Default)]
pub struct Store {
    map: Mutex<BTreeMap<String, String>>,
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding two sample orders, as the `orders` service writes them.
    pub fn with_sample_orders() -> Self {
        let s = Self::new();
        for line in [
            r#"SET order:1 {"id":1,"item":"espresso beans","qty":2,"created_by":null}"#,
            r#"SET order:2 {"id":2,"item":"oat milk","qty":6,"created_by":null}"#,
            "SET seq:order 2",
        ] {
            s.execute(line);
        }
        s
    }

    /// Runs one command line (without its newline) and returns the reply (without newline).
    pub fn execute(&self, line: &str) -> String {
        let line = line.trim_end_matches('\r');
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let Ok(mut map) = self.map.lock() else {
            return "ERR store unavailable".into();
        };
        let key_ok = |k: &str| !k.is_empty() && !k.contains(char::is_whitespace);
        match cmd.to_ascii_uppercase().as_str() {
            "PING" => "PONG".into(),
            "GET" if key_ok(rest) => match map.get(rest) {
                Some(v) => format!("VALUE {v}"),
                None => "NONE".into(),
            },
            "SET" => match rest.split_once(' ') {
                Some((k, v)) if key_ok(k) => {
                    map.insert(k.to_owned(), v.to_owned());
                    "OK".into()
                }
                _ => "ERR usage: SET key value".into(),
            },
            "INCR" if key_ok(rest) => {
                let n = match map.get(rest).map(|v| v.parse::<u64>()) {
                    None => 1,
                    Some(Ok(n)) => n.saturating_add(1),
                    Some(Err(_)) => return "ERR value is not an integer".into(),
                };
                map.insert(rest.to_owned(), n.to_string());
                format!("VALUE {n}")
            }
            "KEYS" => {
                let keys: Vec<&str> = map
                    .range(rest.to_owned()..)
                    .map(|(k, _)| k.as_str())
                    .take_while(|k| k.starts_with(rest))
                    .collect();
                if keys.is_empty() {
                    "KEYS".into()
                } else {
                    format!("KEYS {}", keys.join(" "))
                }
            }
            "GET" | "INCR" => format!("ERR usage: {cmd} key"),
            _ => "ERR unknown command (GET, SET, INCR, KEYS, PING)".into(),
        }
    }
}

/// Serves the store on `listener` until the task is dropped; one task per connection.
pub async fn serve(listener: TcpListener, store: Arc<Store>) -> anyhow::Result<()> {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait a little and go on.
                eprintln!("db: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(tcp, &store).await {
                eprintln!("db: connection ended: {e:#}");
            }
        });
    }
}

async fn connection(tcp: TcpStream, store: &Store) -> anyhow::Result<()> {
    let (r, mut w) = tcp.into_split();
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut r)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
            .context("read")?;
        if n == 0 {
            return Ok(());
        }
        if buf.last() != Some(&b'\n') {
            if n == MAX_LINE {
                w.write_all(b"ERR line too long\n").await.context("write")?;
            }
            return Ok(());
        }
        let reply = match std::str::from_utf8(&buf[..n - 1]) {
            Ok(line) => store.execute(line),
            Err(_) => "ERR not UTF-8".into(),
        };
        w.write_all(format!("{reply}\n").as_bytes())
            .await
            .context("write")?;
    }
}

/// A client connection to the store (directly, or through a sidecar's outbound port).
pub struct Client {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    /// Connects to `addr` within 5 s.
    pub async fn connect(addr: &str) -> anyhow::Result<Self> {
        let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to db at {addr}: timed out"))?
            .with_context(|| format!("connecting to db at {addr}"))?;
        let (r, w) = tcp.into_split();
        Ok(Self {
            r: BufReader::new(r),
            w,
        })
    }

    /// Sends one command and returns the reply line; an `ERR` reply is an error.
    pub async fn command(&mut self, line: &str) -> anyhow::Result<String> {
        if line.contains('\n') {
            bail!("a command may not contain a newline");
        }
        let fut = async {
            self.w
                .write_all(format!("{line}\n").as_bytes())
                .await
                .context("sending to db")?;
            let mut reply = String::new();
            let n = (&mut self.r)
                .take(MAX_LINE as u64)
                .read_line(&mut reply)
                .await
                .context("reading from db")?;
            if n == 0 {
                bail!("the connection was closed without an answer");
            }
            Ok(reply.trim_end().to_owned())
        };
        let reply = tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .context("db did not answer within 10 s")??;
        match reply.strip_prefix("ERR ") {
            Some(why) => bail!("db: {why}"),
            None => Ok(reply),
        }
    }

    /// `GET key`: the value, or `None`.
    pub async fn get(&mut self, key: &str) -> anyhow::Result<Option<String>> {
        let r = self.command(&format!("GET {key}")).await?;
        Ok(r.strip_prefix("VALUE ").map(str::to_owned))
    }

    /// `SET key value`.
    pub async fn set(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        self.command(&format!("SET {key} {value}"))
            .await
            .map(|_| ())
    }

    /// `INCR key`: the new value.
    pub async fn incr(&mut self, key: &str) -> anyhow::Result<u64> {
        let r = self.command(&format!("INCR {key}")).await?;
        r.strip_prefix("VALUE ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unexpected INCR reply {r:?}"))
    }

    /// `KEYS prefix`: the matching keys, sorted.
    pub async fn keys(&mut self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let r = self.command(&format!("KEYS {prefix}")).await?;
        let rest = r
            .strip_prefix("KEYS")
            .with_context(|| format!("unexpected KEYS reply {r:?}"))?;
        Ok(rest.split_whitespace().map(str::to_owned).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_do_what_the_table_says() {
        let s = Store::new();
        assert_eq!(s.execute("PING"), "PONG");
        assert_eq!(s.execute("GET a"), "NONE");
        assert_eq!(s.execute("SET a hello world"), "OK");
        assert_eq!(s.execute("GET a"), "VALUE hello world");
        assert_eq!(s.execute("INCR n"), "VALUE 1");
        assert_eq!(s.execute("INCR n"), "VALUE 2");
        assert_eq!(s.execute("INCR a"), "ERR value is not an integer");
        assert_eq!(s.execute("SET b:1 x"), "OK");
        assert_eq!(s.execute("KEYS b:"), "KEYS b:1");
        assert_eq!(s.execute("KEYS zz"), "KEYS");
        assert!(s.execute("SET novalue").starts_with("ERR"));
        assert!(s.execute("GET").starts_with("ERR"));
        assert!(s.execute("DROP everything").starts_with("ERR"));
    }

    #[tokio::test]
    async fn a_client_talks_to_a_served_store() -> anyhow::Result<()> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?.to_string();
        let task = tokio::spawn(serve(l, Arc::new(Store::with_sample_orders())));
        let mut c = Client::connect(&addr).await?;
        assert_eq!(c.keys("order:").await?, ["order:1", "order:2"]);
        assert_eq!(c.incr("seq:order").await?, 3);
        c.set("k", "v v").await?;
        assert_eq!(c.get("k").await?.as_deref(), Some("v v"));
        assert!(c.command("NOPE").await.is_err());
        task.abort();
        Ok(())
    }
}
