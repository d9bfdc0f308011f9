//! Progress for long CLI work: a redrawn bar on a terminal, plain lines otherwise (logs, CI).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A progress line on stderr. On a terminal it redraws in place; otherwise it prints a plain
/// line at most every `every` (and always the last one).
pub struct ProgressLine {
    label: String,
    terminal: bool,
    every: Duration,
    last: Option<Instant>,
}

impl ProgressLine {
    pub fn new(label: impl Into<String>) -> Self {
        Self::with_terminal(label, std::io::stderr().is_terminal())
    }

    pub fn with_terminal(label: impl Into<String>, terminal: bool) -> Self {
        Self {
            label: label.into(),
            terminal,
            every: Duration::from_secs(5),
            last: None,
        }
    }

    /// `done` of `total` units; `detail` is appended (rate, ETA, current item).
    pub fn update(&mut self, done: u64, total: u64, detail: &str) {
        let finished = total > 0 && done >= total;
        let due = self.last.is_none_or(|t| t.elapsed() >= self.every);
        if !self.terminal && !due && !finished {
            return;
        }
        self.last = Some(Instant::now());
        let line = render(&self.label, done, total, detail, self.terminal);
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r\x1b[2K{line}");
            if finished {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }
}

/// `label [#####-----]  50% 5/10 detail` on a terminal, `label: 50% (5/10) detail` otherwise.
pub fn render(label: &str, done: u64, total: u64, detail: &str, bar: bool) -> String {
    let frac = if total == 0 {
        0.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    };
    let pct = (frac * 100.0).floor() as u32;
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!(" {detail}")
    };
    if bar {
        const WIDTH: usize = 30;
        let filled = (frac * WIDTH as f64).round() as usize;
        format!(
            "{label} [{}{}] {pct:>3}%{detail}",
            "#".repeat(filled),
            "-".repeat(WIDTH - filled)
        )
    } else {
        format!("{label}: {pct}% ({done}/{total}){detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bar_and_plain_forms() {
        assert_eq!(
            render("steps", 2, 4, "", true),
            format!("steps [{}{}]  50%", "#".repeat(15), "-".repeat(15))
        );
        assert_eq!(
            render("steps", 2, 4, "1.2 s", false),
            "steps: 50% (2/4) 1.2 s"
        );
        // Never past 100 %, and no division by zero.
        assert_eq!(render("x", 9, 4, "", false), "x: 100% (9/4)");
        assert_eq!(render("x", 0, 0, "", false), "x: 0% (0/0)");
    }
}
