//! The submit function's real binary under `cargo lambda`'s runtime emulator, with job specs on
//! the local S3 server and AWS Batch played by moto: a spec becomes one job (also when its
//! event is delivered twice), a bad spec is answered in S3 without a job, and a Batch outage
//! fails the invocation so that Lambda retries it.

use aws_sdk_batch::config::{BehaviorVersion, Credentials, Region};
use llm_store::S3;
use llm_tests::cargo_lambda::CargoLambdaWatch;
use llm_tests::local_batch::{local_batch, LocalBatch};
use llm_tests::local_s3::local_s3;
use llm_tests::s3_events::s3_event_json;
use serde_json::{json, Value};

const BUCKET: &str = "submit-function";

fn start(batch_endpoint: &str, batch: &LocalBatch) -> CargoLambdaWatch {
    CargoLambdaWatch::start(
        env!("CARGO_BIN_EXE_submit"),
        &local_s3().function_env(&[("AWS_ENDPOINT_URL_BATCH", batch_endpoint), ("JOB_QUEUE", &batch.queue), ("JOB_DEFINITION", &batch.definition)]),
    )
}

/// The jobs of this name on moto's queue, as DescribeJobs returns them.
fn jobs_named(batch: &LocalBatch, name: &str) -> Vec<aws_sdk_batch::types::JobDetail> {
    let config = aws_sdk_batch::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(&batch.endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .build();
    let client = aws_sdk_batch::Client::from_conf(config);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let filter = aws_sdk_batch::types::KeyValuesPair::builder().name("JOB_NAME").values(name).build();
        let listed = client.list_jobs().job_queue(&batch.queue).filters(filter).send().await.unwrap();
        let ids: Vec<String> = listed.job_summary_list().iter().filter_map(|j| j.job_id().map(String::from)).collect();
        if ids.is_empty() {
            return Vec::new();
        }
        client.describe_jobs().set_jobs(Some(ids)).send().await.unwrap().jobs().to_vec()
    })
}

fn answer(s3: &S3, name: &str) -> Value {
    let bytes = s3.get(BUCKET, &format!("training/submitted/{name}.json")).unwrap().expect("an answer beside the spec");
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn a_spec_in_s3_becomes_one_batch_job() {
    let (_, batch) = (local_s3(), local_batch());
    let s3 = S3::connect().unwrap();
    s3.create_bucket(BUCKET).unwrap();
    let command = [
        "finetune",
        "--base",
        "s3://submit-function/training/base/",
        "--data",
        "s3://submit-function/training/chat.jsonl",
        "--method",
        "lora",
        "--output",
        "s3://submit-function/incoming/chat-lora/",
    ];
    s3.put(BUCKET, "training/jobs/chat lora.json", serde_json::to_vec(&json!({"command": command, "gpus": 1, "vcpus": 8, "timeout_seconds": 3600})).unwrap())
        .unwrap();
    s3.put(
        BUCKET,
        "training/jobs/elsewhere.json",
        serde_json::to_vec(&json!({"command": ["finetune", "--data", "s3://other-bucket/training/d.jsonl", "--output", "s3://submit-function/training/o/"]}))
            .unwrap(),
    )
    .unwrap();

    let watch = start(&batch.endpoint, batch);
    let event = s3_event_json(
        BUCKET,
        &[
            ("ObjectCreated:Put", "training/jobs/chat+lora.json"),
            ("ObjectCreated:Put", "training/jobs/elsewhere.json"),
            ("ObjectCreated:Put", "training/submitted/chat+lora.json"),
            ("ObjectRemoved:Delete", "training/jobs/old.json"),
        ],
    );
    let response = watch.invoke(&event).unwrap_or_else(|e| panic!("{e}\n{}", watch.log()));
    let outcomes: Value = serde_json::from_str(&response).unwrap();
    assert_eq!(outcomes.as_array().map(Vec::len), Some(2), "only the two specs are handled: {outcomes}");
    let job_name = outcomes[0]["job_name"].as_str().expect("submitted").to_string();
    assert!(job_name.starts_with("llm-chat-lora-"), "{job_name}");
    assert_eq!(outcomes[0]["duplicate"], false);

    let jobs = jobs_named(batch, &job_name);
    assert_eq!(jobs.len(), 1);
    let container = jobs[0].container().expect("a container job");
    let mut expected: Vec<&str> = command.to_vec();
    expected.extend(["--resume", "--device", "cuda"]);
    assert_eq!(container.command(), expected);
    assert_eq!(jobs[0].job_definition(), Some(batch.definition.as_str()));
    assert_eq!(answer(&s3, "chat lora")["job_id"].as_str(), jobs[0].job_id());

    let refused = answer(&s3, "elsewhere");
    assert!(refused["error"].as_str().is_some_and(|e| e.contains("s3://other-bucket")), "{refused}");
    assert!(outcomes[1]["job_name"].is_null(), "no job for a refused spec: {outcomes}");

    // S3 delivers events at least once: the same spec again finds its job.
    let again: Value = serde_json::from_str(&watch.invoke(&event).unwrap()).unwrap();
    assert_eq!(again[0]["duplicate"], true, "{again}");
    assert_eq!(again[0]["job_id"], outcomes[0]["job_id"]);
    assert_eq!(jobs_named(batch, &job_name).len(), 1, "submitted once");

    // A new version of the spec is a new job.
    s3.put(BUCKET, "training/jobs/chat lora.json", serde_json::to_vec(&json!({"command": command, "gpus": 2})).unwrap()).unwrap();
    let changed: Value =
        serde_json::from_str(&watch.invoke(&s3_event_json(BUCKET, &[("ObjectCreated:Put", "training/jobs/chat+lora.json")])).unwrap()).unwrap();
    assert_ne!(changed[0]["job_name"], outcomes[0]["job_name"]);
    assert_eq!(changed[0]["duplicate"], false);

    let log = watch.log();
    assert!(log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).any(|l| l["message"] == "submitted"), "no JSON log line:\n{log}");
}

#[test]
fn a_batch_outage_fails_the_invocation_for_a_retry() {
    let (_, batch) = (local_s3(), local_batch());
    let s3 = S3::connect().unwrap();
    s3.create_bucket(BUCKET).unwrap();
    s3.put(
        BUCKET,
        "training/jobs/outage.json",
        serde_json::to_vec(&json!({"command": ["distill", "--output", "s3://submit-function/training/out/"]})).unwrap(),
    )
    .unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let watch = start(&format!("http://{closed}"), batch);
    let result = watch.invoke(&s3_event_json(BUCKET, &[("ObjectCreated:Put", "training/jobs/outage.json")]));
    assert!(result.as_ref().is_err_and(|e| e.contains("AWS Batch ListJobs")), "{result:?}\n{}", watch.log());
    assert!(s3.get(BUCKET, "training/submitted/outage.json").unwrap().is_none(), "no answer until the job is submitted");
}
