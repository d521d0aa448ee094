//! Printing check reports (the types live in [`stacyvm_core::checks`]).

use std::io::Write;

pub use stacyvm_core::checks::Report;

/// Prints `report` to stdout as text or JSON and turns failures into the
/// command's error (`<what> found N failing check(s)`, exit code 1).
pub fn finish(report: &Report, json: bool, what: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report.to_json())?;
        writeln!(out)?;
    } else {
        report.write_text(&mut out)?;
    }
    out.flush()?;
    drop(out);
    if !json {
        eprintln!("{what}: {}", report.summary());
    }
    match report.failures() {
        0 => Ok(()),
        n => anyhow::bail!("{what} found {n} failing check(s)"),
    }
}
