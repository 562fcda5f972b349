//! Observability shared by the Lambda functions and the `llm` CLI: one place that decides how
//! logs look (JSON lines inside Lambda, readable text on a terminal) and writes metrics in
//! CloudWatch Embedded Metric Format (EMF), which Lambda turns into metrics from stdout without
//! any API call. Knows nothing of models or S3.

mod emf;

pub use emf::{Metrics, Unit};

/// Logs go to stderr, as JSON lines when running inside Lambda (`AWS_LAMBDA_FUNCTION_NAME`),
/// as text otherwise. `RUST_LOG` sets the filter; `default_level` applies without it.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if in_lambda() {
        builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
    } else {
        builder.try_init()
    };
}

/// Whether this process is a Lambda function (or `cargo lambda`'s emulation of one).
pub fn in_lambda() -> bool {
    std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some()
}

/// The wall-clock deadline of an invocation from the runtime API's `Lambda-Runtime-Deadline-Ms`;
/// `None` for one already past, which is what `cargo lambda watch` sends (Lambda never does).
pub fn invocation_deadline(epoch_ms: u64) -> Option<std::time::SystemTime> {
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(epoch_ms)).filter(|d| *d > std::time::SystemTime::now())
}
