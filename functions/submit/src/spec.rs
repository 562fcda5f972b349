//! The job spec a user writes to `training/jobs/<name>.json`, and the checks that refuse a
//! job before it costs a GPU instance: a spec that would fail on the instance (a typo, an S3
//! location the job's role cannot reach, no S3 output) fails here, in milliseconds, instead.

use serde::Deserialize;

/// Where job specs are written; the S3 event filter of the template names the same prefix.
pub const JOBS_PREFIX: &str = "training/jobs/";
/// Where the function writes what became of each spec (`<name>.json`: the job id or the error).
pub const SUBMITTED_PREFIX: &str = "training/submitted/";
/// The prefixes the training job's role may read and write (template.yaml, `TrainingJobRole`).
pub const JOB_PREFIXES: [&str; 2] = ["training/", "incoming/"];
/// Specs are a few hundred bytes; anything much larger is not a spec.
pub const MAX_SPEC_BYTES: u64 = 64 << 10;

/// The `llm` commands a training job may run.
const COMMANDS: [&str; 3] = ["finetune", "distill", "merge"];
const MAX_ARGS: usize = 200;
const MAX_ARG_BYTES: usize = 4096;

/// `{"command": ["finetune", "--base", "s3://…", …], "vcpus": 8, "memory_mib": 30000, "gpus": 1,
/// "timeout_seconds": 7200}`: the `llm` command line and optional overrides of the job
/// definition's resources.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub command: Vec<String>,
    pub gpus: Option<u32>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub timeout_seconds: Option<u32>,
}

/// A spec that passed the checks: the command the container runs, completed with what a job
/// on a Spot GPU instance needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub job_name: String,
    pub command: Vec<String>,
    pub spec: JobSpec,
}

/// Parses and checks the spec at `key` of `bucket`; `version` (the object's ETag) makes the
/// job name unique per content, so a duplicate event finds the job it already submitted.
pub fn submission(bucket: &str, key: &str, version: &str, bytes: &[u8]) -> Result<Submission, String> {
    let name = key
        .strip_prefix(JOBS_PREFIX)
        .and_then(|rest| rest.strip_suffix(".json"))
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| format!("`{key}` is not {JOBS_PREFIX}<name>.json"))?;
    let spec: JobSpec = serde_json::from_slice(bytes).map_err(|e| format!("not a job spec: {e}"))?;
    check_command(bucket, &spec.command)?;
    for (field, value, limit) in [("gpus", spec.gpus, 8), ("vcpus", spec.vcpus, 192), ("memory_mib", spec.memory_mib, 1 << 21)] {
        if value.is_some_and(|v| v == 0 || v > limit) {
            return Err(format!("`{field}` must be between 1 and {limit}"));
        }
    }
    if spec.timeout_seconds.is_some_and(|t| t < 60) {
        return Err("`timeout_seconds` must be at least 60 (AWS Batch's minimum)".into());
    }
    Ok(Submission { job_name: job_name(name, version), command: completed(&spec.command), spec })
}

fn check_command(bucket: &str, command: &[String]) -> Result<(), String> {
    let Some(first) = command.first() else { return Err("`command` is empty".into()) };
    if !COMMANDS.contains(&first.as_str()) {
        return Err(format!("`{first}` is not one of the training commands: {}", COMMANDS.join(", ")));
    }
    if command.len() > MAX_ARGS || command.iter().any(|a| a.len() > MAX_ARG_BYTES || a.chars().any(char::is_control)) {
        return Err(format!("`command` must be at most {MAX_ARGS} arguments of at most {MAX_ARG_BYTES} bytes, without control characters"));
    }
    for uri in command.iter().filter(|a| a.starts_with("s3://")) {
        let reachable = uri
            .strip_prefix("s3://")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(b, key)| b == bucket && JOB_PREFIXES.iter().any(|p| key.starts_with(p)) && !key.split('/').any(|s| s == ".."));
        if !reachable {
            let allowed: Vec<String> = JOB_PREFIXES.iter().map(|p| format!("s3://{bucket}/{p}…")).collect();
            return Err(format!("`{uri}`: a job may only use {}", allowed.join(" and ")));
        }
    }
    let output = command.iter().position(|a| a == "--output").and_then(|i| command.get(i + 1));
    match output {
        Some(uri) if uri.starts_with("s3://") => Ok(()),
        Some(other) => Err(format!("`--output {other}` would be lost with the instance: use an s3:// location")),
        None => Err("`command` has no `--output`".into()),
    }
}

/// Training commands resume from the checkpoint a reclaimed Spot attempt left on S3, and run on
/// the instance's GPU unless the spec chose a device.
fn completed(command: &[String]) -> Vec<String> {
    let mut command = command.to_vec();
    if matches!(command[0].as_str(), "finetune" | "distill") {
        if !command.iter().any(|a| a == "--resume") {
            command.push("--resume".into());
        }
        if !command.iter().any(|a| a == "--device" || a.starts_with("--device=")) {
            command.extend(["--device".into(), "cuda".into()]);
        }
    }
    command
}

/// AWS Batch job names: at most 128 of `[A-Za-z0-9_-]`, starting with a letter or digit.
fn job_name(name: &str, version: &str) -> String {
    let clean =
        |s: &str, max: usize| -> String { s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' }).take(max).collect() };
    format!("llm-{}-{}", clean(name, 100), clean(version, 16))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "command": command })).unwrap()
    }

    #[test]
    fn completes_a_finetune_for_spot_gpus() {
        let command = ["finetune", "--base", "s3://b/training/base", "--data", "s3://b/training/d.jsonl", "--output", "s3://b/incoming/m"];
        let s = submission("b", "training/jobs/my run.json", "0123456789abcdef0123", &spec(&command)).unwrap();
        assert_eq!(s.job_name, "llm-my-run-0123456789abcdef");
        assert_eq!(&s.command[..command.len()], &command);
        assert_eq!(&s.command[command.len()..], ["--resume", "--device", "cuda"]);
        let merge = submission(
            "b",
            "training/jobs/m.json",
            "e",
            &spec(&["merge", "--base", "s3://b/training/a", "--adapter", "s3://b/training/l", "--output", "s3://b/incoming/m"]),
        )
        .unwrap();
        assert_eq!(merge.command.len(), 7, "merge has no --resume or --device");
        let on_cpu = submission("b", "training/jobs/m.json", "e", &spec(&["distill", "--device", "cpu", "--output", "s3://b/training/o", "--resume"])).unwrap();
        assert_eq!(on_cpu.command.len(), 6, "nothing added");
    }

    #[test]
    fn refuses_what_would_fail_on_the_instance() {
        let cases: [(&str, &[u8]); 9] = [
            ("training/jobs/x.yaml", b"{}"),
            ("training/jobs/a/b.json", b"{}"),
            ("training/jobs/x.json", b"not json"),
            ("training/jobs/x.json", br#"{"command": ["finetune"], "gpu": 1}"#),
            ("training/jobs/x.json", &spec(&[])),
            ("training/jobs/x.json", &spec(&["serve", "--output", "s3://b/training/o"])),
            ("training/jobs/x.json", &spec(&["finetune", "--data", "s3://other/training/d", "--output", "s3://b/training/o"])),
            ("training/jobs/x.json", &spec(&["finetune", "--data", "s3://b/training/../models/d", "--output", "s3://b/training/o"])),
            ("training/jobs/x.json", &spec(&["finetune", "--output", "/tmp/out"])),
        ];
        for (key, bytes) in cases {
            assert!(submission("b", key, "e", bytes).is_err(), "{key} {}", String::from_utf8_lossy(bytes));
        }
        let zero_gpus = br#"{"command": ["finetune", "--output", "s3://b/training/o"], "gpus": 0}"#;
        assert!(submission("b", "training/jobs/x.json", "e", zero_gpus).unwrap_err().contains("gpus"));
    }
}
