//! A function binary run by `cargo lambda watch` (the Lambda runtime API emulator) on
//! 127.0.0.1, and `cargo lambda invoke` to call it. `.ci/run` installs cargo-lambda from PyPI.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct CargoLambdaWatch {
    pub port: u16,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The workspace root, where `cargo lambda` finds the functions.
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

impl CargoLambdaWatch {
    /// Starts `cargo lambda watch` for `bin` of `package` with `env` set for the function, and
    /// waits until it accepts invocations.
    pub fn start(package: &str, bin: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("watch.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let port = free_port();
        let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut command = Command::new("cargo");
        command
            .current_dir(workspace_root())
            .args(["lambda", "watch", "-A", "127.0.0.1", "-P", &port.to_string(), "--ignore-changes", "-p", package, "--bin", bin])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            // Its own process group, so that the function it spawns is stopped with it.
            .process_group(0);
        for var in &vars {
            command.args(["--env-var", var]);
        }
        let child = command.spawn().expect("cargo lambda: is cargo-lambda installed (pip install cargo-lambda)?");
        let watch = Self { port, child, log, _dir: dir };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(120), "cargo lambda watch did not start:\n{}", watch.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        watch
    }

    /// `cargo lambda invoke FUNCTION --data-file` with `payload`; returns the response body,
    /// or the error output when the invocation fails.
    pub fn invoke(&self, function: &str, payload: &str) -> Result<String, String> {
        let data = self._dir.path().join("payload.json");
        std::fs::write(&data, payload).expect("payload file");
        let output = Command::new("cargo")
            .args(["lambda", "invoke", "-A", "127.0.0.1", "-P", &self.port.to_string(), "--data-file"])
            .arg(&data)
            .arg(function)
            .output()
            .expect("cargo lambda invoke");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(stdout)
        } else {
            Err(format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)))
        }
    }

    /// Everything `cargo lambda watch` and the function printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CargoLambdaWatch {
    fn drop(&mut self) {
        // The whole group: cargo-lambda, `cargo run` and the function.
        let _ = Command::new("kill").args(["-TERM", "--", &format!("-{}", self.child.id())]).status();
        let _ = self.child.wait();
    }
}
