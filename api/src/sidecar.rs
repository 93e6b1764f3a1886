//! The model-server sidecar's command line, derived from a Backend spec.
//!
//! The operator (container args) and local mode (process args) both call [`sidecar_args`], and
//! the sidecar parses exactly these flags, so the three can never drift apart.

use crate::backend::{BackendSpec, SIDECAR_PORT};

/// Flag names understood by `serval-sidecar`.
pub mod flags {
    /// Model location: a path, `file://`, `http://` or `https://` URI.
    pub const MODEL: &str = "--model";
    /// Expected SHA-256 of the model file, hex.
    pub const SHA256: &str = "--sha256";
    /// Model name served in the inference protocol paths.
    pub const NAME: &str = "--name";
    /// Listen address.
    pub const HOST: &str = "--host";
    /// Listen port.
    pub const PORT: &str = "--port";
    /// Admin port: health and metrics only, outside the connection bound.
    pub const ADMIN_PORT: &str = "--admin-port";
    /// Most rows per batch.
    pub const MAX_BATCH_SIZE: &str = "--max-batch-size";
    /// Longest batch fill wait, microseconds.
    pub const MAX_DELAY_MICROS: &str = "--max-delay-micros";
    /// Queue bound in rows.
    pub const MAX_QUEUE: &str = "--max-queue";
    /// Longest expected queue wait a request is admitted with, milliseconds.
    pub const MAX_QUEUE_DELAY_MILLIS: &str = "--max-queue-delay-millis";
    /// Inference worker threads.
    pub const WORKERS: &str = "--workers";
    /// JSON of [`crate::Preprocess`].
    pub const PREPROCESS: &str = "--preprocess";
    /// JSON of [`crate::Postprocess`].
    pub const POSTPROCESS: &str = "--postprocess";
    /// Idle-polling window after each answered request, microseconds; 0 disables.
    pub const IDLE_POLL_MICROS: &str = "--idle-poll-micros";
    /// Share of inference requests answered 500 on purpose, percent (fault injection).
    pub const FAULT_ERROR_PERCENT: &str = "--fault-error-percent";
    /// Delay added to every inference request on purpose, milliseconds (fault injection).
    pub const FAULT_DELAY_MILLIS: &str = "--fault-delay-millis";
}

/// Arguments for one `serval-sidecar` process serving `name` with `spec`.
///
/// `model` is where this process finds the model: the spec's URI in a cluster, a resolved local
/// path in local mode, or a mount path for `pvc://` models.
pub fn sidecar_args(
    name: &str,
    spec: &BackendSpec,
    model: &str,
    host: &str,
    port: u16,
) -> Vec<String> {
    let b = &spec.batching;
    let mut args = vec![
        flags::MODEL.to_owned(),
        model.to_owned(),
        flags::NAME.to_owned(),
        name.to_owned(),
        flags::HOST.to_owned(),
        host.to_owned(),
        flags::PORT.to_owned(),
        port.to_string(),
        flags::MAX_BATCH_SIZE.to_owned(),
        b.max_batch_size.to_string(),
        flags::MAX_DELAY_MICROS.to_owned(),
        b.max_delay_micros.to_string(),
        flags::MAX_QUEUE.to_owned(),
        b.max_queue.to_string(),
        flags::MAX_QUEUE_DELAY_MILLIS.to_owned(),
        b.max_queue_delay_millis.to_string(),
    ];
    if let Some(sha) = &spec.model.sha256 {
        args.extend([flags::SHA256.to_owned(), sha.to_ascii_lowercase()]);
    }
    if let Some(w) = b.workers {
        args.extend([flags::WORKERS.to_owned(), w.to_string()]);
    }
    // Idle polling spins on CPU time nothing else wants, but a CPU limit's quota would still
    // pay for it and throttle real work: off under a limit.
    if has_cpu_limit(spec) {
        args.extend([flags::IDLE_POLL_MICROS.to_owned(), "0".to_owned()]);
    }
    // Serializing these plain data types cannot fail; an empty object is the safe fallback.
    if let Some(pre) = &spec.preprocess {
        let json = serde_json::to_string(pre).unwrap_or_else(|_| "{}".to_owned());
        args.extend([flags::PREPROCESS.to_owned(), json]);
    }
    if let Some(post) = &spec.postprocess {
        let json = serde_json::to_string(post).unwrap_or_else(|_| "{}".to_owned());
        args.extend([flags::POSTPROCESS.to_owned(), json]);
    }
    args
}

/// Backend annotation: answer this percentage of inference requests with a 500, on purpose
/// (fault injection, to rehearse a rollback or an alert).
pub const FAULT_ERROR_PERCENT_ANNOTATION: &str = "serval.dev/fault-error-percent";
/// Backend annotation: delay every inference request by this many milliseconds, on purpose.
pub const FAULT_DELAY_MILLIS_ANNOTATION: &str = "serval.dev/fault-delay-millis";

/// Model-server arguments for the fault-injection annotations of a Backend; values that do
/// not parse are left out.
pub fn fault_args(annotations: Option<&std::collections::BTreeMap<String, String>>) -> Vec<String> {
    let mut args = Vec::new();
    let Some(a) = annotations else {
        return args;
    };
    if let Some(p) = a
        .get(FAULT_ERROR_PERCENT_ANNOTATION)
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|p| (0.0..=100.0).contains(p) && *p > 0.0)
    {
        args.extend([flags::FAULT_ERROR_PERCENT.to_owned(), p.to_string()]);
    }
    if let Some(ms) = a
        .get(FAULT_DELAY_MILLIS_ANNOTATION)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
    {
        args.extend([flags::FAULT_DELAY_MILLIS.to_owned(), ms.to_string()]);
    }
    args
}

/// Whether the model-server container has a CPU limit (CFS quota).
pub fn has_cpu_limit(spec: &BackendSpec) -> bool {
    spec.resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .is_some_and(|l| l.contains_key("cpu"))
}

/// The default in-pod listen address and port.
pub fn default_listen() -> (&'static str, u16) {
    ("0.0.0.0", SIDECAR_PORT)
}
