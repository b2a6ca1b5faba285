//! How both binaries print an error: the error and its causes, each said once.

/// An error and its causes, each said once. Several library errors show their source in their
/// own message (`cannot listen on ADDR: Address already in use`) and also return it as
/// `source()`: printing the chain (`{:#}` with anyhow) would say it twice.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut last = String::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let msg = c.to_string();
        cause = c.source();
        if !last.is_empty() && last.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
        last = msg;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot listen on 127.0.0.1:1: {0}")]
    struct Listen(#[source] std::io::Error);

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let e = Listen(std::io::Error::from(std::io::ErrorKind::AddrInUse));
        let text = report(&e);
        assert_eq!(text.matches("address in use").count(), 1, "{text}");
    }
}
