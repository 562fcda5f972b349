//! Wires [`batch_function::handle`] to the Lambda runtime. The model is loaded by the first
//! invocation and kept for the next ones (`MODEL_URI` and the rest, as the inference function).

use std::time::SystemTime;

use aws_lambda_events::s3::S3Event;
use batch_function::{handle, Config};
use lambda_runtime::{service_fn, LambdaEvent};
use llm_store::S3;

fn main() -> Result<(), lambda_runtime::Error> {
    llm_observe::init_logging("info");
    llm_engine::threads::configure(llm_observe::lambda_cpu_share())?;
    let state = llm_api::state_from_env()?;
    let config = Config::from_env()?;
    let s3 = S3::connect()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let engine = runtime.handle().clone();
    runtime.block_on(lambda_runtime::run(service_fn(|event: LambdaEvent<S3Event>| {
        let (s3, state, config, engine) = (s3.clone(), state.clone(), config.clone(), engine.clone());
        async move {
            let deadline = llm_observe::invocation_deadline(event.context.deadline);
            let seconds_left = deadline.and_then(|d| d.duration_since(SystemTime::now()).ok()).map(|d| d.as_secs_f64());
            tracing::info!(request_id = %event.context.request_id, seconds_left, records = event.payload.records.len(), "invoked");
            let outcomes = tokio::task::spawn_blocking(move || handle(&s3, &engine, &state, &config, &event.payload, deadline)).await??;
            Ok::<_, lambda_runtime::Error>(outcomes)
        }
    })))
}
