//! Observability shared by the Lambda functions and the `llm` CLI: one place that decides how
//! logs look (JSON lines inside Lambda, readable text on a terminal) and writes metrics in
//! CloudWatch Embedded Metric Format (EMF), which Lambda turns into metrics from stdout without
//! any API call. Knows nothing of models or S3.

mod emf;

pub use emf::{Metrics, Unit};

/// Logs go to stderr, as JSON lines when running inside Lambda (`AWS_LAMBDA_FUNCTION_NAME`),
/// as text otherwise (colored only on a terminal, so that a log file or pipe reads as plain
/// text). `RUST_LOG` sets the filter; `default_level` applies without it.
pub fn init_logging(default_level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let _ = if in_lambda() { builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init() } else { builder.try_init() };
}

/// Whether this process is a Lambda function (or `cargo lambda`'s emulation of one).
pub fn in_lambda() -> bool {
    std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some()
}

/// A Lambda function's share of CPU in whole threads: Lambda gives CPU in proportion to memory
/// (one vCPU's worth at 1,769 MB, six at 10,240 MB) while the machine shows more cores, and threads
/// beyond the share only contend for it (every matrix product waits for its slowest thread).
/// `None` outside Lambda (`AWS_LAMBDA_FUNCTION_MEMORY_SIZE` unset).
pub fn lambda_cpu_share() -> Option<usize> {
    let memory_mb: u64 = std::env::var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").ok()?.trim().parse().ok()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(threads_for_memory(memory_mb, cores))
}

/// The share of `memory_mb`, rounded, at least one thread and at most `cores`.
fn threads_for_memory(memory_mb: u64, cores: usize) -> usize {
    ((memory_mb as f64 / 1769.0).round() as usize).clamp(1, cores.max(1))
}

/// The wall-clock deadline of an invocation from the runtime API's `Lambda-Runtime-Deadline-Ms`;
/// `None` for one already past, which is what `cargo lambda watch` sends (Lambda never does).
pub fn invocation_deadline(epoch_ms: u64) -> Option<std::time::SystemTime> {
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(epoch_ms)).filter(|d| *d > std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::threads_for_memory;

    #[test]
    fn threads_follow_lambdas_cpu_per_memory() {
        assert_eq!(threads_for_memory(128, 2), 1);
        assert_eq!(threads_for_memory(2048, 2), 1);
        assert_eq!(threads_for_memory(3008, 2), 2);
        assert_eq!(threads_for_memory(10_240, 6), 6);
        assert_eq!(threads_for_memory(10_240, 4), 4);
    }
}
