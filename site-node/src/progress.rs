//! Progress display for the hospital operator: bars on a terminal (indicatif), plain log
//! lines otherwise (services, containers, CI).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Whether bars are drawn (stderr is a terminal).
pub fn interactive() -> bool {
    std::io::stderr().is_terminal()
}

/// A bar for `len` local training steps, or a hidden one when not interactive.
pub fn steps(len: u64, round: u32) -> ProgressBar {
    if !interactive() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template("round {prefix} [{bar:30}] {pos}/{len} steps {msg} ({elapsed})").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    bar.set_prefix(round.to_string());
    bar
}

/// A byte-counting bar for a model transfer, or a hidden one when not interactive.
pub fn transfer(bytes: u64, what: &str) -> ProgressBar {
    if !interactive() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(bytes);
    bar.set_style(ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    bar.set_prefix(what.to_string());
    bar
}
