//! Helpers for the tests that run the real `edgeload` binary and read its JSON.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// Runs edgeload with `args` and `--json` against `url`: the report (`Null` if stdout
/// was not JSON), the exit status and stderr. `EDGELOAD_BIN` runs another build (the
/// "before" figures of a closing note).
pub fn edgeload(args: &[&str], url: &str) -> (Value, i32, String) {
    let bin = std::env::var("EDGELOAD_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgeload").to_string());
    let out = Command::new(bin)
        .args(args)
        .arg("--json")
        .arg(url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("edgeload {args:?}: {stdout} {stderr}");
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (v, out.status.code().unwrap_or(-1), stderr)
}

/// The count at `path` (keys joined by `/`: `errors/mismatch`) in a report.
#[track_caller]
pub fn n(v: &Value, path: &str) -> u64 {
    let mut at = v;
    for key in path.split('/') {
        at = &at[key];
    }
    at.as_u64()
        .unwrap_or_else(|| panic!("{path} is not a count in the report: {at}"))
}

/// The README's accounting: every request sent is answered, timed out, failed or
/// outstanding, and has its latency entry unless it failed; with `--rate`, every
/// request due was sent or never sent.
#[track_caller]
pub fn assert_accounted(v: &Value) {
    let sent = n(v, "requests_sent");
    assert_eq!(
        sent,
        n(v, "requests") + n(v, "timed_out") + n(v, "failed") + n(v, "outstanding"),
        "sent = answered + timed out + failed + outstanding"
    );
    if !v["rate"].is_null() {
        assert_eq!(
            n(v, "requests_due"),
            sent + n(v, "unsent"),
            "due = sent + unsent"
        );
    }
    assert_eq!(
        n(v, "latency_us/count"),
        n(v, "requests") + n(v, "timed_out") + n(v, "outstanding"),
        "latency entries = answered + timed out + outstanding"
    );
}

/// A file in the system's temporary directory, removed when dropped.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(name: &str) -> TempFile {
        TempFile(std::env::temp_dir().join(format!("edgeload-{}-{name}", std::process::id())))
    }

    pub fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }

    pub fn read(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
