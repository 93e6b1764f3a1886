//! A crash-looping local replica: why it exited (read from its log), when to start it again,
//! and when its Backend is reported failing rather than still loading.

use std::time::{Duration, Instant};

/// Starts in a row that exit before becoming ready after which a Backend is reported failing:
/// one early exit can be a fluke (a port taken in a race, a process killed by hand); three with
/// the same spec and model are a cause that a restart will not fix.
pub const DEFAULT_FAILED_STARTS: u32 = 3;
/// First wait before restarting a crashed model server, doubled per crash in a row: long enough
/// not to spin on a model that cannot load, short enough that a one-off crash heals at once.
pub const DEFAULT_RESTART_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between restarts, as the kubelet's crash-loop back-off is capped: a model file
/// fixed on disk is picked up within this without an edit to the manifest.
pub const DEFAULT_MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);
/// Error lines kept per process to explain its exit; the latest ones are what a user needs.
pub const ERROR_LINES_KEPT: usize = 8;

/// Wait before the next start after `crashes` crashes in a row (the first crash is 1).
pub fn restart_backoff(crashes: u32) -> Duration {
    let doublings = crashes.saturating_sub(1).min(16);
    DEFAULT_RESTART_BACKOFF
        .saturating_mul(1 << doublings)
        .min(DEFAULT_MAX_RESTART_BACKOFF)
}

/// Whether a log line may explain an exit: the `Error: …` a Rust `main` prints when it returns
/// an error, or a `tracing` line at ERROR level (text format, as local mode runs children).
pub fn is_error_line(line: &str) -> bool {
    line.starts_with("Error: ") || line.contains(" ERROR ")
}

/// The reason a process gave for exiting, from its error lines, oldest first.
///
/// `main`'s own `Error: …` line wins (its last word, whatever was logged before); otherwise the
/// last ERROR event, its `error=` field if it has one, else its message.
pub fn failure_reason(lines: &[String]) -> Option<String> {
    let last_word = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("Error: "))
        .map(str::trim)
        .filter(|r| !r.is_empty());
    if let Some(reason) = last_word {
        return Some(reason.to_owned());
    }
    lines.iter().rev().find_map(|line| {
        let (_, event) = line.split_once(" ERROR ")?;
        let reason = match event.split_once(" error=") {
            Some((_, error)) => error,
            // `target: message fields`
            None => event.split_once(": ").map_or(event, |(_, m)| m),
        };
        let reason = reason.trim().trim_matches('"');
        (!reason.is_empty()).then(|| reason.to_owned())
    })
}

/// Unexpected exits of one Backend's replicas since one of them was last ready.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restarts {
    crashes: u32,
    failed_starts: u32,
    reason: Option<String>,
    not_before: Option<Instant>,
}

impl Restarts {
    /// Records an exit nobody asked for at `now` and returns the wait before the next start.
    /// `was_ready`: the replica had served; a crash then is not a failed start.
    pub fn exited(&mut self, was_ready: bool, reason: String, now: Instant) -> Duration {
        self.crashes += 1;
        if !was_ready {
            self.failed_starts += 1;
        }
        self.reason = Some(reason);
        let wait = restart_backoff(self.crashes);
        self.not_before = Some(now + wait);
        wait
    }

    /// Whether the back-off since the last crash is over.
    pub fn may_start(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|t| now >= t)
    }

    /// Replicas keep exiting before they become ready: a restart alone will not help.
    pub fn is_failing(&self) -> bool {
        self.failed_starts >= DEFAULT_FAILED_STARTS
    }

    /// `exited 3 times before becoming ready: <reason>`, once a start has failed.
    pub fn summary(&self) -> Option<String> {
        if self.failed_starts == 0 {
            return None;
        }
        let times = match self.failed_starts {
            1 => "once".to_owned(),
            n => format!("{n} times"),
        };
        let reason = self.reason.as_deref().unwrap_or("no reason in its log");
        Some(format!("exited {times} before becoming ready: {reason}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines()
            .filter(|l| is_error_line(l))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_sha256_mismatch_is_read_from_the_sidecars_last_words() {
        let log = lines(
            "2026-12-05T01:24:12.573385Z  INFO serval_sidecar::server: listening addr=127.0.0.1:1 model=x\n\
             2026-12-05T01:24:12.574024Z ERROR serval_sidecar::server: model load failed; it will not be served error=model /m/d.onnx has sha256 cc3b, expected aaaa: refusing to serve it\n\
             2026-12-05T01:24:13.585174Z  INFO serval_sidecar::server: stopped\n\
             Error: model /m/d.onnx has sha256 cc3b, expected aaaa: refusing to serve it\n\
             \n\
             Stack backtrace:\n   0: msg<alloc::string::String>\n",
        );
        assert_eq!(log.len(), 2, "INFO lines and the backtrace are not kept");
        assert_eq!(
            failure_reason(&log).as_deref(),
            Some("model /m/d.onnx has sha256 cc3b, expected aaaa: refusing to serve it")
        );
    }

    #[test]
    fn without_last_words_the_last_error_event_explains_the_exit() {
        let log = lines(
            "2026-12-05T01:24:13Z ERROR serval_sidecar::batcher: batch failed error=\"early\" rows=1\n\
             2026-12-05T01:24:13Z ERROR serval_sidecar::server: model load failed; it will not be served error=cannot compile model: bad protobuf\n",
        );
        assert_eq!(
            failure_reason(&log).as_deref(),
            Some("cannot compile model: bad protobuf")
        );
        let panic = lines("2026-12-05T01:24:13Z ERROR serval_sidecar: panic thread=main");
        assert_eq!(failure_reason(&panic).as_deref(), Some("panic thread=main"));
    }

    #[test]
    fn a_process_that_logged_no_error_has_no_reason() {
        assert_eq!(failure_reason(&lines("all fine\n INFO stopped\n")), None);
        assert_eq!(failure_reason(&["Error: ".to_owned()]), None);
    }

    #[test]
    fn restarts_back_off_exponentially_up_to_the_cap() {
        assert_eq!(restart_backoff(1), DEFAULT_RESTART_BACKOFF);
        assert_eq!(restart_backoff(2), DEFAULT_RESTART_BACKOFF * 2);
        assert_eq!(restart_backoff(3), DEFAULT_RESTART_BACKOFF * 4);
        assert_eq!(restart_backoff(1_000), DEFAULT_MAX_RESTART_BACKOFF);
        assert_eq!(restart_backoff(u32::MAX), DEFAULT_MAX_RESTART_BACKOFF);
    }

    #[test]
    fn a_backend_is_failing_after_its_starts_keep_exiting_before_ready() {
        let now = Instant::now();
        let mut r = Restarts::default();
        assert!(r.may_start(now) && r.summary().is_none());
        let wait = r.exited(false, "bad sha256".to_owned(), now);
        assert!(!r.may_start(now) && r.may_start(now + wait));
        assert_eq!(
            r.summary().as_deref(),
            Some("exited once before becoming ready: bad sha256")
        );
        for _ in 1..DEFAULT_FAILED_STARTS {
            assert!(!r.is_failing());
            r.exited(false, "bad sha256".to_owned(), now);
        }
        assert!(r.is_failing());
        assert_eq!(
            r.summary(),
            Some(format!(
                "exited {DEFAULT_FAILED_STARTS} times before becoming ready: bad sha256"
            ))
        );
    }

    #[test]
    fn crashes_after_serving_back_off_but_are_not_failed_starts() {
        let now = Instant::now();
        let mut r = Restarts::default();
        for _ in 0..DEFAULT_FAILED_STARTS {
            r.exited(true, "killed".to_owned(), now);
        }
        assert!(!r.is_failing() && r.summary().is_none());
        assert!(!r.may_start(now));
    }
}
