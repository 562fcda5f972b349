//! Wires [`quantize_function::handle`] to the Lambda runtime. The conversion is blocking
//! (rayon, and a blocking S3 client with its own runtime), so it runs on a blocking thread.

use std::time::SystemTime;

use aws_lambda_events::s3::S3Event;
use lambda_runtime::{service_fn, LambdaEvent};
use llm_store::S3;
use quantize_function::{handle, Config, Summary};

fn main() -> Result<(), lambda_runtime::Error> {
    llm_observe::init_logging("info");
    llm_engine::threads::configure(llm_observe::lambda_cpu_share())?;
    let config = Config::from_env()?;
    let s3 = S3::connect()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(lambda_runtime::run(service_fn(|event: LambdaEvent<S3Event>| {
        let (s3, config) = (s3.clone(), config.clone());
        async move {
            let deadline = llm_observe::invocation_deadline(event.context.deadline);
            let seconds_left = deadline.and_then(|d| d.duration_since(SystemTime::now()).ok()).map(|d| d.as_secs_f64());
            tracing::info!(request_id = %event.context.request_id, seconds_left, records = event.payload.records.len(), "invoked");
            let summary: Summary = tokio::task::spawn_blocking(move || handle(&s3, &config, &event.payload, deadline)).await??;
            Ok::<_, lambda_runtime::Error>(summary)
        }
    })))
}
