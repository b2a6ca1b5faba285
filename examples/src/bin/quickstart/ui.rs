//! Narration: numbered steps, indented detail wrapped at 80 columns, progress on waits.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Total width of the output.
pub(crate) const WIDTH: usize = 80;
/// Indentation of detail lines under a step title.
const INDENT: &str = "      ";

/// How the narration is printed.
pub(crate) struct Ui {
    /// Animated progress (a terminal, not `--ci`).
    live: bool,
    total: usize,
    n: usize,
}

impl Ui {
    pub(crate) fn new(ci: bool, total: usize) -> Self {
        Self {
            live: !ci && std::io::stdout().is_terminal(),
            total,
            n: 0,
        }
    }

    fn out(&self, s: &str) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    }

    /// A heading line.
    pub(crate) fn title(&self, s: &str) {
        self.out(s);
    }

    /// A blank line.
    pub(crate) fn blank(&self) {
        self.out("");
    }

    /// `[n/N] title`.
    pub(crate) fn step(&mut self, title: &str) {
        self.n += 1;
        self.out("");
        self.out(&format!("[{}/{}] {title}", self.n, self.total));
    }

    /// An indented paragraph, wrapped at 80 columns.
    pub(crate) fn say(&self, s: &str) {
        for line in wrap(s, WIDTH - INDENT.len()) {
            self.out(&format!("{INDENT}{line}"));
        }
    }

    /// An indented paragraph with a hanging indent for its continuation lines.
    pub(crate) fn item(&self, head: &str, s: &str) {
        let pad = " ".repeat(head.chars().count());
        let lines = wrap(s, WIDTH - INDENT.len() - pad.len());
        for (i, line) in lines.iter().enumerate() {
            let h = if i == 0 { head } else { pad.as_str() };
            self.out(&format!("{INDENT}{h}{line}"));
        }
    }

    /// Lines shown as they are (command output), indented twice; long lines are wrapped
    /// with a `  ` continuation.
    pub(crate) fn quote(&self, text: &str) {
        let ind = format!("{INDENT}  ");
        for raw in text.lines() {
            let lines = wrap(raw, WIDTH - ind.len() - 2);
            for (i, line) in lines.iter().enumerate() {
                let cont = if i == 0 { "" } else { "  " };
                self.out(format!("{ind}{cont}{line}").trim_end());
            }
        }
    }

    /// A command line as the user would type it (not wrapped, so it can be copied).
    pub(crate) fn command(&self, cmd: &str) {
        self.out(&format!("{INDENT}$ {cmd}"));
    }

    /// A long command as the user would type it: `chunks` (an option with its value, say)
    /// packed into lines that fit, joined with `\` continuations.
    pub(crate) fn command_chunks(&self, chunks: &[String]) {
        let room = WIDTH - INDENT.len() - 2 - 2;
        let mut lines: Vec<String> = Vec::new();
        for c in chunks {
            match lines.last_mut() {
                Some(l) if l.chars().count() + 1 + c.chars().count() <= room => {
                    l.push(' ');
                    l.push_str(c);
                }
                _ => lines.push(c.clone()),
            }
        }
        let n = lines.len();
        for (i, l) in lines.iter().enumerate() {
            let head = if i == 0 { "$ " } else { "    " };
            let tail = if i + 1 < n { " \\" } else { "" };
            self.out(&format!("{INDENT}{head}{l}{tail}"));
        }
    }

    /// Runs `fut` while showing `label` and the elapsed seconds; prints the outcome line.
    pub(crate) async fn progress<T>(&self, label: &str, fut: impl Future<Output = T>) -> T {
        let start = Instant::now();
        if !self.live {
            self.say(&format!("{label} ..."));
            let out = fut.await;
            self.say(&format!("... done ({:.1}s)", start.elapsed().as_secs_f64()));
            return out;
        }
        tokio::pin!(fut);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let frames = ['|', '/', '-', '\\'];
        let mut i = 0usize;
        let out = loop {
            tokio::select! {
                v = &mut fut => break v,
                _ = tick.tick() => {
                    let line = format!(
                        "{INDENT}{} {label} {:.0}s",
                        frames[i % frames.len()],
                        start.elapsed().as_secs_f64()
                    );
                    i += 1;
                    let mut o = std::io::stdout().lock();
                    let _ = write!(o, "\r{line:<w$}", w = WIDTH - 1);
                    let _ = o.flush();
                }
            }
        };
        let mut o = std::io::stdout().lock();
        let _ = write!(o, "\r{:<w$}\r", "", w = WIDTH - 1);
        let _ = o.flush();
        drop(o);
        self.say(&format!("{label} ({:.1}s)", start.elapsed().as_secs_f64()));
        out
    }
}

/// Greedy word wrap at `width` characters; a word longer than the width is cut.
pub(crate) fn wrap(s: &str, width: usize) -> Vec<String> {
    let width = width.max(10);
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in s.split(' ') {
        let mut word = word.to_owned();
        loop {
            let cur_len = cur.chars().count();
            let w_len = word.chars().count();
            let need = if cur.is_empty() {
                w_len
            } else {
                cur_len + 1 + w_len
            };
            if need <= width {
                if !cur.is_empty() {
                    cur.push(' ');
                }
                cur.push_str(&word);
                break;
            }
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
                continue;
            }
            // A single word wider than the line: cut it.
            let head: String = word.chars().take(width).collect();
            word = word.chars().skip(width).collect();
            lines.push(head);
            if word.is_empty() {
                break;
            }
        }
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
}

/// A table with fixed column widths; the last column wraps.
pub(crate) fn table(ui: &Ui, header: &[&str], widths: &[usize], rows: &[Vec<String>]) {
    let fmt_row = |cells: &[String]| -> Vec<String> {
        let last = widths.len() - 1;
        let fixed: usize = widths[..last].iter().map(|w| w + 2).sum();
        let wrapped = wrap(&cells[last], WIDTH - INDENT.len() - fixed);
        let mut out = Vec::new();
        for (i, part) in wrapped.iter().enumerate() {
            let mut line = String::new();
            for (c, w) in widths[..last].iter().enumerate() {
                let cell: String = if i == 0 {
                    cells[c].chars().take(*w).collect()
                } else {
                    String::new()
                };
                line.push_str(&format!("{cell:<w$}  "));
            }
            line.push_str(part);
            out.push(line.trim_end().to_owned());
        }
        out
    };
    let h: Vec<String> = header.iter().map(|s| (*s).to_owned()).collect();
    for l in fmt_row(&h) {
        ui.out(&format!("{INDENT}{l}"));
    }
    for row in rows {
        for l in fmt_row(row) {
            ui.out(&format!("{INDENT}{l}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn wraps_at_the_width() {
        assert_eq!(
            wrap("aaa bbbb cccc ddddd e", 10),
            ["aaa bbbb", "cccc ddddd", "e"]
        );
        assert_eq!(wrap("", 10), [""]);
        assert_eq!(wrap("abcdefghijklmno", 10), ["abcdefghij", "klmno"]);
    }
}
