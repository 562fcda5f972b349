//! A stand-in for AWS Batch on 127.0.0.1: moto's server (`pip install 'moto[server]'`, which
//! `.ci/run` installs), started once per test process, with a job queue and a job definition.
//! It implements the Batch API (jobs are recorded, not run), so the submit function's real
//! aws-sdk-batch calls are checked for their shape and effect.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct LocalBatch {
    pub endpoint: String,
    pub queue: String,
    pub definition: String,
    _watchdog: Child,
}

static SERVER: OnceLock<LocalBatch> = OnceLock::new();

pub fn local_batch() -> &'static LocalBatch {
    SERVER.get_or_init(|| {
        // Among this process's ports, beside the local S3 server's.
        let port = crate::local_s3::process_ports() + 5;
        let script =
            format!("moto_server -H 127.0.0.1 -p {port} & server=$!; while kill -0 {} 2>/dev/null; do sleep 1; done; kill $server", std::process::id());
        let watchdog = Command::new("sh").args(["-c", &script]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("sh");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(60), "moto_server did not start: pip install 'moto[server]'");
            std::thread::sleep(Duration::from_millis(100));
        }
        let endpoint = format!("http://127.0.0.1:{port}");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/batch_queue.py");
        let output = Command::new("python3").args([script, &endpoint]).output().expect("python3");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let arns: serde_json::Value = serde_json::from_slice(&output.stdout).expect("ARNs as JSON");
        let arn = |name: &str| arns[name].as_str().expect("an ARN").to_string();
        LocalBatch { queue: arn("queue"), definition: arn("definition"), endpoint, _watchdog: watchdog }
    })
}
