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

/// The exit status of a command whose output was closed early (`mayfly-ca audit tail | head`):
/// 128 + SIGPIPE, what a shell reports for a program the signal ended.
pub const CLOSED_OUTPUT_EXIT: i32 = 141;

/// Makes a write to a closed standard output (the reader of a pipe went away: `| head`) end the
/// program quietly with [`CLOSED_OUTPUT_EXIT`], as the default SIGPIPE action does for C
/// programs, instead of a panic message ("failed printing to stdout: Broken pipe"). Rust
/// ignores SIGPIPE, so `println!` panics on such a write; every other panic is reported as
/// before. Both binaries call this first in `main`.
pub fn end_quietly_on_closed_output() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if is_closed_output(message) {
            std::process::exit(CLOSED_OUTPUT_EXIT);
        }
        default(info);
    }));
}

/// The panic message of `print!`/`println!` on a closed pipe.
fn is_closed_output(message: &str) -> bool {
    message.starts_with("failed printing to stdout")
        && (message.contains("Broken pipe") || message.contains("os error 32"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot listen on 127.0.0.1:1: {0}")]
    struct Listen(#[source] std::io::Error);

    #[test]
    fn only_a_print_to_a_closed_pipe_counts_as_closed_output() {
        assert!(is_closed_output(
            "failed printing to stdout: Broken pipe (os error 32)"
        ));
        assert!(!is_closed_output(
            "failed printing to stdout: No space left on device (os error 28)"
        ));
        assert!(!is_closed_output(
            "called `Option::unwrap()` on a `None` value"
        ));
    }

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let e = Listen(std::io::Error::from(std::io::ErrorKind::AddrInUse));
        let text = report(&e);
        assert_eq!(text.matches("address in use").count(), 1, "{text}");
    }
}
