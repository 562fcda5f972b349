//! `template.yaml` against the code it deploys: every function is a workspace binary built by
//! cargo lambda, every setting the code reads is set, the S3 event filters are the prefixes
//! the code uses, each function's IAM statements allow exactly the calls it makes (recorded by
//! a proxy in front of the local S3 and Batch servers), and cfn-lint and `sam validate --lint`
//! pass. The training job's role is checked the same way in functions/llm/tests/training.rs.
//! The security settings are checked too: a TLS-only private bucket, a signed API by default,
//! no request text in logs.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime};

use llm_api::model_source::{load_from_s3, DownloadSettings};
use llm_store::registry::{INCOMING_PREFIX, JOB_FILE, MODELS_PREFIX};
use llm_store::S3;
use llm_tests::local_batch::local_batch;
use llm_tests::local_s3::local_s3;
use llm_tests::recording_proxy::RecordingProxy;
use llm_tests::s3_events::{s3_event_json, upload_checkpoint};
use llm_tests::template::{denied, strings, unused, Template};
use llm_tests::workspace_root;
use serde_json::Value;
use submit_function::spec::{JOBS_PREFIX, SUBMITTED_PREFIX};

/// The bucket name the template gives a stack `llm-serverless` in account 123456789012.
const BUCKET: &str = "llm-serverless-models-123456789012";

/// A workspace package: its source directory and the workspace packages it depends on.
struct Package {
    src: PathBuf,
    path_dependencies: Vec<String>,
}

/// The workspace's packages by name, and its binaries with the package of each.
fn workspace() -> (HashMap<String, Package>, Vec<(String, String)>) {
    let output =
        Command::new(env!("CARGO")).args(["metadata", "--no-deps", "--format-version", "1"]).current_dir(workspace_root()).output().expect("cargo metadata");
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("cargo metadata JSON");
    let (mut packages, mut binaries) = (HashMap::new(), Vec::new());
    for package in metadata["packages"].as_array().expect("packages") {
        let name = package["name"].as_str().expect("name").to_string();
        for target in package["targets"].as_array().expect("targets") {
            if target["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin")) {
                binaries.push((target["name"].as_str().expect("name").to_string(), name.clone()));
            }
        }
        let path_dependencies = package["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["path"].is_string() && d["kind"].is_null())
            .filter_map(|d| d["name"].as_str().map(String::from))
            .collect();
        let src = PathBuf::from(package["manifest_path"].as_str().expect("manifest path")).with_file_name("src");
        packages.insert(name, Package { src, path_dependencies });
    }
    (packages, binaries)
}

fn functions(template: &Template) -> Vec<(String, String)> {
    let mut functions: Vec<(String, String)> = template
        .resources_of("AWS::Serverless::Function")
        .into_iter()
        .map(|name| {
            let binary =
                template.resource(&name)["Metadata"]["BuildProperties"]["Binary"].as_str().unwrap_or_else(|| panic!("{name} names no Binary")).to_string();
            (name, binary)
        })
        .collect();
    functions.sort();
    functions
}

#[test]
fn every_function_is_a_workspace_binary_built_by_cargo_lambda() {
    let template = Template::load();
    let binaries: Vec<String> = workspace().1.into_iter().map(|(name, _)| name).collect();
    let functions = functions(&template);
    assert_eq!(functions.iter().map(|(_, b)| b.as_str()).collect::<Vec<_>>(), ["batch", "infer", "quantize", "submit"]);
    for (name, binary) in &functions {
        assert!(binaries.contains(binary), "{name}: no binary `{binary}` in the workspace ({binaries:?})");
        let resource = template.resource(name);
        assert_eq!(resource["Metadata"]["BuildMethod"].as_str(), Some("rust-cargolambda"), "{name}");
        assert_eq!(resource["Properties"]["CodeUri"].as_str(), Some("."), "{name}: cargo lambda builds from the workspace root");
    }
    let globals = &template.0["Globals"]["Function"];
    assert_eq!((globals["Runtime"].as_str(), globals["Handler"].as_str()), (Some("provided.al2023"), Some("bootstrap")));
    let url = &template.resource("InferenceFunction")["Properties"]["FunctionUrlConfig"];
    assert_eq!(url["InvokeMode"].as_str(), Some("RESPONSE_STREAM"), "the API streams tokens");
}

/// The environment variable names a package's code reads, its workspace dependencies' included
/// (through `var`, `var_os`, or the `number`/`setting` helpers the configuration code uses);
/// Lambda's own `AWS_*` variables aside.
fn variables_read(packages: &HashMap<String, Package>, package: &str, names: &mut BTreeSet<String>) {
    let package = &packages[package];
    let mut dirs = vec![package.src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src dir").flatten() {
            if entry.path().is_dir() {
                dirs.push(entry.path());
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for helper in ["var(\"", "var_os(\"", "number(\"", "setting(\""] {
                // `set_var("` sets a variable for what the code starts; it reads nothing.
                for (at, _) in text.match_indices(helper).filter(|(at, _)| !text[..*at].ends_with("set_")) {
                    let name: String = text[at + helper.len()..].chars().take_while(|c| *c != '"').collect();
                    if !name.starts_with("AWS_") && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') {
                        names.insert(name);
                    }
                }
            }
        }
    }
    for dependency in &package.path_dependencies {
        variables_read(packages, dependency, names);
    }
}

#[test]
fn the_template_sets_every_setting_the_code_reads_and_no_other() {
    let template = Template::load();
    let (packages, binaries) = workspace();
    for (name, binary) in functions(&template) {
        let package = &binaries.iter().find(|(b, _)| *b == binary).expect("a binary").1;
        let mut read = BTreeSet::new();
        variables_read(&packages, package, &mut read);
        let set: BTreeSet<String> = template.environment(&name).into_iter().collect();
        assert!(!read.is_empty(), "{name}: found no settings read by {package}");
        assert_eq!(read, set, "{name}: {package} and its workspace dependencies read {read:?}; the template sets {set:?}");
    }
}

fn s3_filter(template: &Template, function: &str, event: &str) -> (String, String) {
    let rules =
        template.resource(function)["Properties"]["Events"][event]["Properties"]["Filter"]["S3Key"]["Rules"].as_sequence().expect("S3Key rules").clone();
    let rule = |name: &str| {
        rules.iter().find(|r| r["Name"] == name).and_then(|r| r["Value"].as_str()).unwrap_or_else(|| panic!("{function}: no {name} rule")).to_string()
    };
    (rule("prefix"), rule("suffix"))
}

#[test]
fn event_filters_are_the_prefixes_the_code_uses_and_outputs_never_match_them() {
    let template = Template::load();
    assert_eq!(s3_filter(&template, "QuantizeFunction", "JobFile"), (INCOMING_PREFIX.to_string(), JOB_FILE.to_string()));
    assert_eq!(s3_filter(&template, "SubmitFunction", "JobSpec"), (JOBS_PREFIX.to_string(), ".json".to_string()));
    assert_eq!(s3_filter(&template, "BatchFunction", "BatchFile"), (batch_function::INPUT_PREFIX.to_string(), ".jsonl".to_string()));
    assert_eq!(s3_filter(&template, "BatchFunction", "Continuation"), (batch_function::CONTINUE_PREFIX.to_string(), ".json".to_string()));
    // What each function writes is outside the prefix that starts it.
    assert!(!MODELS_PREFIX.starts_with(INCOMING_PREFIX));
    assert!(!SUBMITTED_PREFIX.starts_with(JOBS_PREFIX));
    for written in [batch_function::OUTPUT_PREFIX, batch_function::STATE_PREFIX] {
        assert!(!written.starts_with(batch_function::INPUT_PREFIX) && !written.starts_with(batch_function::CONTINUE_PREFIX));
    }
}

#[test]
fn each_function_is_allowed_the_calls_it_makes_and_no_more() {
    let (server, batch) = (local_s3(), local_batch());
    let setup = S3::connect().unwrap();
    upload_checkpoint(&setup, BUCKET, "incoming/tiny/", "llama2");
    setup.put(BUCKET, "incoming/tiny/quantize.json", br#"{"types": ["q8_0"]}"#.to_vec()).unwrap();
    let spec = r#"{"command": ["finetune", "--base", "s3://llm-serverless-models-123456789012/training/base/", "--output", "s3://llm-serverless-models-123456789012/incoming/tuned/"]}"#;
    setup.put(BUCKET, "training/jobs/tune.json", spec.as_bytes().to_vec()).unwrap();

    // From here on every S3 and Batch call of this process goes through a recording proxy.
    let (s3_proxy, batch_proxy) = (RecordingProxy::start(&server.endpoint), RecordingProxy::start(&batch.endpoint));
    std::env::set_var("AWS_ENDPOINT_URL", &s3_proxy.endpoint);
    std::env::set_var("AWS_ENDPOINT_URL_BATCH", &batch_proxy.endpoint);
    let s3 = S3::connect().unwrap();
    let template = Template::load();
    let names = [
        ("AWS::Partition", "aws"),
        ("AWS::StackName", "llm-serverless"),
        ("AWS::AccountId", "123456789012"),
        ("ModelBucket", BUCKET),
        ("TrainingJobQueue", batch.queue.as_str()),
        ("TrainingJobDefinition", batch.definition.as_str()),
    ];
    let check = |function: &str, calls: Vec<llm_tests::recording_proxy::Call>, exempt: &[(&str, &str)]| {
        let statements = template.statements(function, &names);
        assert!(!calls.is_empty(), "{function}: no calls recorded");
        let denied = denied(&statements, &calls);
        assert!(denied.is_empty(), "{function} makes calls its policy does not allow: {denied:#?}");
        let unused = unused(&statements, &calls, exempt);
        assert!(unused.is_empty(), "{function}'s policy allows what it never does: {unused:#?}");
    };

    // The quantization function converts the checkpoint, then sees the same event again.
    let event = serde_json::from_str(&s3_event_json(BUCKET, &[("ObjectCreated:Put", "incoming/tiny/quantize.json")])).unwrap();
    let deadline = Some(SystemTime::now() + Duration::from_secs(900));
    for _ in 0..2 {
        quantize_function::handle(&s3, &quantize_function::Config::default(), &event, deadline).unwrap();
    }
    // Aborting a multipart upload happens only when one fails (tests/tests/quantize_faults.rs).
    check("QuantizeFunction", s3_proxy.take(), &[("WriteVersions", "s3:AbortMultipartUpload")]);

    // The inference function loads the alias the quantization function wrote, and a missing one.
    let settings = DownloadSettings { part_size: 256 << 10, ..Default::default() };
    load_from_s3(&s3, BUCKET, "models/tiny/latest", Default::default(), &settings).unwrap();
    assert!(load_from_s3(&s3, BUCKET, "models/missing/latest", Default::default(), &settings).is_err());
    check("InferenceFunction", s3_proxy.take(), &[]);

    // The submit function submits a spec, and answers one deleted before it was read.
    let queue = submit_function::JobQueue::connect(&batch.queue, &batch.definition).unwrap();
    let event =
        serde_json::from_str(&s3_event_json(BUCKET, &[("ObjectCreated:Put", "training/jobs/tune.json"), ("ObjectCreated:Put", "training/jobs/gone.json")]))
            .unwrap();
    let outcomes = submit_function::handle(&s3, &queue, &event).unwrap();
    assert_eq!(outcomes.len(), 2);
    let mut calls = s3_proxy.take();
    calls.extend(batch_proxy.take());
    check("SubmitFunction", calls, &[]);

    // The batch function: a model that is not there (an error, retried), then a file answered
    // over two invocations (one continuation), then an event whose file is gone.
    let engine = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let model_state = |alias: &str| {
        let loader = llm_api::model_source::loader(&format!("s3://{BUCKET}/{alias}"), Default::default(), DownloadSettings::default()).unwrap();
        std::sync::Arc::new(llm_api::AppState::new(llm_api::ModelSlot::new("tiny", loader), Default::default(), None))
    };
    let config = batch_function::Config { chunk_lines: 1, ..Default::default() };
    let line = |id: &str| {
        format!(r#"{{"custom_id": "{id}", "method": "POST", "url": "/v1/completions", "body": {{"model": "tiny", "prompt": "hello", "max_tokens": 2}}}}"#)
    };
    setup.put(BUCKET, "batches/input/two.jsonl", format!("{}\n{}", line("a"), line("b")).into_bytes()).unwrap();
    let event = |key: &str| serde_json::from_str(&s3_event_json(BUCKET, &[("ObjectCreated:Put", key)])).unwrap();
    let soon = || Some(SystemTime::now() + Duration::from_millis(1));
    let handle = |state: &std::sync::Arc<llm_api::AppState>, key: &str| batch_function::handle(&s3, engine.handle(), state, &config, &event(key), soon());
    assert!(handle(&model_state("models/missing/latest"), "batches/input/two.jsonl").is_err());
    let state = model_state("models/tiny/latest");
    assert_eq!(handle(&state, "batches/input/two.jsonl").unwrap()[0].status, batch_function::Status::Continued);
    assert_eq!(handle(&state, "batches/continue/two.json").unwrap()[0].status, batch_function::Status::Completed);
    assert_eq!(handle(&state, "batches/input/gone.jsonl").unwrap()[0].status, batch_function::Status::Failed);
    check("BatchFunction", s3_proxy.take(), &[]);
}

/// The bucket refuses every request made without TLS and all public access, the function URL
/// needs SigV4-signed requests unless the deployer chooses otherwise, and no function logs
/// prompts or completions unless told to.
#[test]
fn the_bucket_is_private_and_tls_only_the_api_signed_and_text_unlogged() {
    let template = Template::load();
    let names = [("AWS::Partition", "aws"), ("ModelBucket", BUCKET)];
    let policy = &template.resource("ModelBucketTlsOnly")["Properties"];
    assert_eq!(strings(&policy["Bucket"], &names), [BUCKET]);
    let statements = policy["PolicyDocument"]["Statement"].as_sequence().expect("statements");
    assert!(
        statements.iter().any(|s| s["Effect"] == "Deny"
            && s["Principal"] == "*"
            && strings(&s["Action"], &names) == ["s3:*"]
            && strings(&s["Resource"], &names) == [format!("arn:aws:s3:::{BUCKET}"), format!("arn:aws:s3:::{BUCKET}/*")]
            && s["Condition"]["Bool"]["aws:SecureTransport"] == "false"),
        "{statements:?}"
    );
    let bucket = &template.resource("ModelBucket")["Properties"];
    for setting in ["BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"] {
        assert_eq!(bucket["PublicAccessBlockConfiguration"][setting], true, "{setting}");
    }
    assert!(!bucket["BucketEncryption"].is_null());

    assert_eq!(template.0["Parameters"]["ApiAuth"]["Default"], "AWS_IAM");
    let url = &template.resource("InferenceFunction")["Properties"]["FunctionUrlConfig"];
    assert_eq!(strings(&url["AuthType"], &[("ApiAuth", "AWS_IAM")]), ["AWS_IAM"]);
    for (function, _) in functions(&template) {
        let log_text = &template.resource(&function)["Properties"]["Environment"]["Variables"]["LOG_TEXT"];
        assert!(log_text.is_null() || *log_text == "false", "{function} logs request text: {log_text:?}");
    }
}

#[test]
fn cfn_lint_and_sam_validate_pass() {
    for (tool, args) in [("cfn-lint", &["template.yaml"][..]), ("sam", &["validate", "--lint", "--region", "us-east-1"][..])] {
        let output = Command::new(tool)
            .args(args)
            .current_dir(workspace_root())
            .env("SAM_CLI_TELEMETRY", "0")
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e} (.ci/run installs it from PyPI)"));
        assert!(output.status.success(), "{tool} {args:?}:\n{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    }
}
