//! A function binary run against `cargo lambda watch`'s emulation of the Lambda runtime API,
//! on 127.0.0.1, and `cargo lambda invoke` to call it. `.ci/run` installs cargo-lambda from PyPI.
//!
//! The emulator runs with `--only-lambda-apis` and the test starts the binary cargo already
//! built for it (`CARGO_BIN_EXE_*`): letting `cargo lambda watch` build the function itself
//! would compile the dependency tree again with one package's features.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::workspace_root;

/// The name cargo lambda gives a function it does not start itself.
pub const FUNCTION: &str = "_";

pub struct CargoLambdaWatch {
    pub port: u16,
    emulator: Child,
    function: Child,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(name)).expect("log file")
}

impl CargoLambdaWatch {
    /// Starts the runtime API emulator, then `binary` with `env` as its function.
    pub fn start(binary: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let emulator_log = log_file(dir.path(), "emulator.log");
        let emulator = Command::new("cargo")
            .current_dir(workspace_root())
            .args(["lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1", "-P", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(emulator_log.try_clone().expect("log file"))
            .stderr(emulator_log)
            // Its own process group, so that everything it starts is stopped with it.
            .process_group(0)
            .spawn()
            .expect("cargo lambda: is cargo-lambda installed (pip install cargo-lambda)?");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(60), "cargo lambda watch did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let function_log = log_file(dir.path(), "function.log");
        let function = Command::new(binary)
            // What Lambda always sets (lambda_runtime requires it); `env` may override it.
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "4096")
            .envs(env.iter().copied())
            .env("AWS_LAMBDA_RUNTIME_API", format!("http://127.0.0.1:{port}/.rt"))
            .env("AWS_LAMBDA_FUNCTION_NAME", FUNCTION)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .stdin(Stdio::null())
            .stdout(function_log.try_clone().expect("log file"))
            .stderr(function_log)
            .spawn()
            .unwrap_or_else(|e| panic!("{binary}: {e}"));
        Self { port, emulator, function, dir }
    }

    /// `cargo lambda invoke --data-file` with `payload`; returns the response body, or the
    /// error output when the invocation fails.
    pub fn invoke(&self, payload: &str) -> Result<String, String> {
        let data = self.dir.path().join("payload.json");
        std::fs::write(&data, payload).expect("payload file");
        let output = Command::new("cargo")
            .args(["lambda", "invoke", "-A", "127.0.0.1", "-P", &self.port.to_string(), "--data-file"])
            .arg(&data)
            .arg(FUNCTION)
            .output()
            .expect("cargo lambda invoke");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(stdout)
        } else {
            Err(format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)))
        }
    }

    /// Where function URL requests go: `http://{address}{url_prefix}/v1/...`.
    pub fn url_prefix(&self) -> String {
        format!("/lambda-url/{FUNCTION}")
    }

    /// Everything the function printed so far (its JSON logs and EMF records).
    pub fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}\n--- cargo lambda ---\n{}", read("function.log"), read("emulator.log"))
    }
}

impl Drop for CargoLambdaWatch {
    fn drop(&mut self) {
        let _ = self.function.kill();
        let _ = self.function.wait();
        let _ = Command::new("kill").args(["-TERM", "--", &format!("-{}", self.emulator.id())]).status();
        let _ = self.emulator.wait();
    }
}
