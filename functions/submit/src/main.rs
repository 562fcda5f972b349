//! Wires [`submit_function::handle`] to the Lambda runtime. `JOB_QUEUE` and `JOB_DEFINITION`
//! (names or ARNs) come from the template.

use aws_lambda_events::s3::S3Event;
use lambda_runtime::{service_fn, LambdaEvent};
use llm_store::S3;
use submit_function::{handle, JobQueue};

fn main() -> Result<(), lambda_runtime::Error> {
    llm_observe::init_logging("info");
    let setting = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let queue = JobQueue::connect(&setting("JOB_QUEUE")?, &setting("JOB_DEFINITION")?)?;
    let s3 = S3::connect()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(lambda_runtime::run(service_fn(|event: LambdaEvent<S3Event>| {
        let (s3, queue) = (s3.clone(), queue.clone());
        async move {
            tracing::info!(request_id = %event.context.request_id, records = event.payload.records.len(), "invoked");
            let outcomes = tokio::task::spawn_blocking(move || handle(&s3, &queue, &event.payload)).await??;
            Ok::<_, lambda_runtime::Error>(outcomes)
        }
    })))
}
