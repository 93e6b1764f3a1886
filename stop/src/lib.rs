//! When a Serval server process should stop draining and exit: on SIGTERM (what Kubernetes
//! sends), on Ctrl-C, and, when asked, once its stdin is closed.
//!
//! The stdin rule is for supervisors such as `serval local`: the supervisor keeps the write end
//! of each child's stdin pipe, and the kernel closes it however the supervisor ends, SIGKILL
//! included, so its children drain and exit instead of being orphaned. In a pod stdin is
//! closed or `/dev/null` from the start, which is why the rule is opt-in.

#![forbid(unsafe_code)]

use std::future::Future;
use std::io::Read;

/// Resolves when the process should stop: SIGTERM or Ctrl-C, or, with `watch_stdin`, stdin
/// reaching end-of-file (or failing).
pub async fn requested(watch_stdin: bool) {
    if !watch_stdin {
        return signal().await;
    }
    let stdin = closed(std::io::stdin());
    tokio::select! {
        () = signal() => {}
        () = stdin => tracing::info!("stdin closed: the supervisor is gone; stopping"),
    }
}

/// SIGTERM or Ctrl-C.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves once `input` reaches end-of-file or fails. The read blocks a plain thread, not
/// tokio's blocking pool: a read cannot be cancelled, and the runtime waits for its pool on
/// shutdown, so it would keep a stopping server from exiting.
fn closed(mut input: impl Read + Send + 'static) -> impl Future<Output = ()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("serval-stdin-watch".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            while matches!(input.read(&mut buf), Ok(n) if n > 0) {}
            let _ = tx.send(());
        });
    let watching = match spawned {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch stdin; only signals stop the server");
            false
        }
    };
    async move {
        // Without a watcher, or should the sender vanish unsent, never resolve: a stop must
        // come from a real end-of-file, not from a failure to watch for one.
        if !watching || rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A pipe's read end that yields `data` and then reaches end-of-file when `done` fires.
    struct Gate {
        data: Vec<u8>,
        done: std::sync::mpsc::Receiver<()>,
    }

    impl Read for Gate {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if !self.data.is_empty() {
                let n = self.data.len().min(buf.len());
                buf[..n].copy_from_slice(&self.data[..n]);
                self.data.drain(..n);
                return Ok(n);
            }
            let _ = self.done.recv();
            Ok(0)
        }
    }

    #[tokio::test]
    async fn input_closing_resolves_and_input_left_open_does_not() {
        let (close, done) = std::sync::mpsc::channel();
        let mut watch = Box::pin(closed(Gate {
            data: b"anything the supervisor writes is ignored".to_vec(),
            done,
        }));
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut watch)
                .await
                .is_err(),
            "still open: must not resolve"
        );
        close.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), watch)
            .await
            .expect("end-of-file resolves the watch");
    }
}
