//! The AWS Batch job queue, through aws-sdk-batch, behind a small blocking interface like
//! `llm_store::S3`'s (the handler is synchronous; do not call it from inside an async task).

use std::sync::Arc;

use aws_sdk_batch::error::DisplayErrorContext;
use aws_sdk_batch::types::{ContainerOverrides, JobTimeout, KeyValuesPair, ResourceRequirement, ResourceType};
use aws_sdk_batch::Client;

use crate::spec::Submission;

#[derive(Debug, thiserror::Error)]
#[error("AWS Batch {operation}: {message}")]
pub struct BatchError {
    operation: &'static str,
    message: String,
}

impl BatchError {
    fn new(operation: &'static str, e: impl std::error::Error) -> Self {
        Self { operation, message: DisplayErrorContext(e).to_string() }
    }
}

#[derive(Clone)]
pub struct JobQueue {
    client: Client,
    runtime: Arc<tokio::runtime::Runtime>,
    /// Name or ARN of the queue, and of the job definition every job starts from.
    queue: String,
    definition: String,
}

impl JobQueue {
    /// The default AWS configuration chain; `AWS_ENDPOINT_URL_BATCH` points it elsewhere.
    pub fn connect(queue: &str, definition: &str) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let config = runtime.block_on(aws_config::load_defaults(aws_config::BehaviorVersion::latest()));
        Ok(Self { client: Client::new(&config), runtime: Arc::new(runtime), queue: queue.into(), definition: definition.into() })
    }

    /// The id of a job of this name on the queue, in any state (Batch keeps finished jobs for
    /// about a week, far longer than S3 takes to deliver an event twice).
    pub fn find(&self, job_name: &str) -> Result<Option<String>, BatchError> {
        let by_name = KeyValuesPair::builder().name("JOB_NAME").values(job_name).build();
        let listed =
            self.runtime.block_on(self.client.list_jobs().job_queue(&self.queue).filters(by_name).send()).map_err(|e| BatchError::new("ListJobs", e))?;
        Ok(listed.job_summary_list().iter().find(|j| j.job_name() == Some(job_name)).and_then(|j| j.job_id().map(str::to_string)))
    }

    /// Submits the job; returns its id.
    pub fn submit(&self, submission: &Submission) -> Result<String, BatchError> {
        let spec = &submission.spec;
        let resources = [(ResourceType::Gpu, spec.gpus), (ResourceType::Vcpu, spec.vcpus), (ResourceType::Memory, spec.memory_mib)]
            .into_iter()
            .filter_map(|(kind, value)| Some(ResourceRequirement::builder().r#type(kind).value(value?.to_string()).build()))
            .collect::<Vec<_>>();
        let overrides = ContainerOverrides::builder()
            .set_command(Some(submission.command.clone()))
            .set_resource_requirements(Some(resources).filter(|r| !r.is_empty()))
            .build();
        let request = self
            .client
            .submit_job()
            .job_name(&submission.job_name)
            .job_queue(&self.queue)
            .job_definition(&self.definition)
            .container_overrides(overrides)
            .set_timeout(spec.timeout_seconds.map(|s| JobTimeout::builder().attempt_duration_seconds(s as i32).build()));
        let submitted = self.runtime.block_on(request.send()).map_err(|e| BatchError::new("SubmitJob", e))?;
        submitted.job_id().map(str::to_string).ok_or(BatchError { operation: "SubmitJob", message: "the response has no job id".into() })
    }
}
