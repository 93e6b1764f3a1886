//! Fetching the model file: a local path, `file://`, or `http(s)://`, always sha256-checked
//! when a digest is configured. A mismatch is an error; the bytes are never served.

use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::errors::{StartupError, StartupResult};

/// Log a download's progress every this many bytes when the server sends no length: often
/// enough to show life on a slow link, rarely enough not to flood logs.
pub const DEFAULT_PROGRESS_EVERY_BYTES: u64 = 8 * 1024 * 1024;
/// Largest model accepted over http(s): 4 GiB is beyond any model a CPU sidecar should serve,
/// and stops a misbehaving server from filling memory.
pub const DEFAULT_MAX_MODEL_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// Reads the model at `uri` and checks it against `sha256` (lowercase hex) if given.
pub async fn fetch(uri: &str, sha256: Option<&str>) -> StartupResult<Vec<u8>> {
    let started = Instant::now();
    let bytes = if uri.starts_with("http://") || uri.starts_with("https://") {
        download(uri).await?
    } else {
        let path = uri.strip_prefix("file://").unwrap_or(uri);
        tokio::fs::read(path)
            .await
            .map_err(|e| source_error(uri, e))?
    };
    let actual = hex::encode(Sha256::digest(&bytes));
    match sha256 {
        Some(expected) if !expected.eq_ignore_ascii_case(&actual) => {
            return Err(StartupError::Sha256Mismatch {
                uri: uri.to_owned(),
                expected: expected.to_owned(),
                actual,
            });
        }
        Some(_) => tracing::info!(uri, sha256 = %actual, "model sha256 verified"),
        None => tracing::warn!(uri, sha256 = %actual, "no sha256 configured; model not verified"),
    }
    tracing::info!(
        uri,
        bytes = bytes.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model fetched"
    );
    Ok(bytes)
}

async fn download(uri: &str) -> StartupResult<Vec<u8>> {
    let client = reqwest::Client::builder()
        .build()
        .map_err(|e| source_error(uri, e))?;
    let mut response = client
        .get(uri)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| source_error(uri, e))?;
    let total = response.content_length();
    if total.is_some_and(|t| t > DEFAULT_MAX_MODEL_BYTES) {
        return Err(source_error(
            uri,
            format!("model larger than {DEFAULT_MAX_MODEL_BYTES} bytes"),
        ));
    }
    tracing::info!(uri, total_bytes = ?total, "downloading model");
    let mut bytes = Vec::with_capacity(total.unwrap_or(0) as usize);
    let mut next_report = report_step(total);
    while let Some(chunk) = response.chunk().await.map_err(|e| source_error(uri, e))? {
        bytes.extend_from_slice(&chunk);
        let got = bytes.len() as u64;
        if got > DEFAULT_MAX_MODEL_BYTES {
            return Err(source_error(
                uri,
                format!("model larger than {DEFAULT_MAX_MODEL_BYTES} bytes"),
            ));
        }
        if got >= next_report {
            match total {
                Some(t) if t > 0 => {
                    tracing::info!(
                        uri,
                        bytes = got,
                        total_bytes = t,
                        percent = got * 100 / t,
                        "download progress"
                    )
                }
                _ => tracing::info!(uri, bytes = got, "download progress"),
            }
            next_report = got + report_step(total);
        }
    }
    if let Some(t) = total.filter(|t| *t != bytes.len() as u64) {
        return Err(source_error(
            uri,
            format!("download ended after {} of {t} bytes", bytes.len()),
        ));
    }
    Ok(bytes)
}

/// Ten reports for a known length, else one per [`DEFAULT_PROGRESS_EVERY_BYTES`].
fn report_step(total: Option<u64>) -> u64 {
    total.map_or(DEFAULT_PROGRESS_EVERY_BYTES, |t| (t / 10).max(1))
}

fn source_error(uri: &str, e: impl std::fmt::Display) -> StartupError {
    StartupError::ModelSource {
        uri: uri.to_owned(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sha256_mismatch_is_refused_and_match_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, b"model bytes").expect("write");
        let good = hex::encode(Sha256::digest(b"model bytes"));
        let uri = format!("file://{}", path.display());
        assert_eq!(
            fetch(&uri, Some(&good)).await.expect("match"),
            b"model bytes"
        );
        let err = fetch(path.to_str().expect("utf8"), Some(&"0".repeat(64))).await;
        assert!(
            matches!(err, Err(StartupError::Sha256Mismatch { .. })),
            "{err:?}"
        );
        assert!(matches!(
            fetch("/nonexistent/m.onnx", None).await,
            Err(StartupError::ModelSource { .. })
        ));
    }
}
