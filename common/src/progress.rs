//! Progress display for operators, shared by both binaries: bars on a terminal (indicatif),
//! hidden bars otherwise (services, containers, CI), where the log lines carry the progress.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` units drawn with `template` (indicatif syntax) and `prefix`, or a hidden
/// bar when stderr is not a terminal.
pub fn bar(len: u64, template: &str, prefix: impl Into<String>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    bar.set_prefix(prefix.into());
    bar
}

/// A bar for `len` local training steps of `round`.
pub fn steps(len: u64, round: u32) -> ProgressBar {
    bar(len, "round {prefix} [{bar:30}] {pos}/{len} steps {msg} ({elapsed})", round.to_string())
}

/// A byte-counting bar for a model transfer.
pub fn transfer(bytes: u64, what: &str) -> ProgressBar {
    bar(bytes, "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}", what)
}

/// A bar counting federated rounds over a whole study.
pub fn rounds(total: u64) -> ProgressBar {
    bar(total, "rounds [{bar:30}] {pos}/{len} {msg} ({elapsed})", "")
}
