//! `llm serve` over real HTTP, called by the official `openai` Python client
//! (`tests/clients/openai_check.py`; `.ci/run` installs the client from PyPI).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Server {
    child: Child,
    base_url: String,
    /// What the server wrote to stderr after its "listening on" line.
    log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Starts `llm serve` on a free port and waits for its "listening on" line.
fn serve(args: &[&str]) -> Server {
    serve_logging(args, "warn")
}

/// [`serve`], logging at `level`.
fn serve_logging(args: &[&str], level: &str) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llm"))
        .args(["serve", "--port", "0"])
        .args(args)
        .env("RUST_LOG", level)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run llm serve");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let base_url = loop {
        let line = lines.next().expect("llm serve exited before listening").expect("stderr line");
        if let Some(url) = line.strip_prefix("listening on ") {
            break format!("{url}/v1");
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|line| sink.lock().unwrap().push_str(&(line + "\n"))));
    Server { child, base_url, log }
}

#[test]
fn the_openai_client_gets_what_it_expects() {
    let model = llama3_fixture();
    let server = serve(&["--model", &model, "--api-key", "sk-test", "--threads", "2"]);
    let out = Command::new("python3")
        .arg(root().join("tests/clients/openai_check.py"))
        // 128009: the fixture's `<|eot_id|>` (`tokenizer.ggml.eos_token_id`).
        .args(["--base-url", &server.base_url, "--model", "llama3-bf16", "--api-key", "sk-test", "--eos-id", "128009"])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "openai client checks failed (is `openai` installed? pip install openai):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `post` against the server, with the body parsed as JSON.
fn post(base_url: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let address = base_url.trim_start_matches("http://").trim_end_matches("/v1");
    let (status, body) = llm_tests::http::post(address, path, body);
    (status, serde_json::from_str(&body).unwrap_or_default())
}

#[test]
fn a_model_that_fails_to_load_is_503_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("late.gguf");
    let server = serve(&["--model", model.to_str().unwrap()]);
    let request = r#"{"model": "late", "prompt": "hello", "max_tokens": 2}"#;
    let (status, body) = post(&server.base_url, "/v1/completions", request);
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("could not be loaded"), "{body}");
    // The file appears: the next request loads it.
    std::fs::copy(root().join("tests/fixtures/llama2/llama2-q8_0.gguf"), &model).unwrap();
    let (status, body) = post(&server.base_url, "/v1/completions", request);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 2, "{body}");
    let (status, body) = post(&server.base_url, "/v1/completions", r#"{"model": "late", "prompt": "hello", "max_tokens": 1, "#);
    assert_eq!((status, body["error"]["type"].as_str()), (400, Some("invalid_request_error")));
}

/// The deployment guide's client (`infra/deploy/chat.py`): the openai client with each request
/// SigV4-signed for a function URL, here against `llm serve` serving the built-in demo model
/// (which ignores the signature: AWS checks it in front of the function).
#[test]
fn the_deployment_chat_client_signs_and_streams() {
    let server = serve(&["--threads", "2"]);
    let url = server.base_url.trim_end_matches("/v1");
    for extra in [&[][..], &["--stream"][..]] {
        let out = Command::new("python3")
            .arg(root().join("infra/deploy/chat.py"))
            .args([url, "Write llama in capitals.", "--region", "us-east-1", "--temperature", "0"])
            .args(extra)
            .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
            .env("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
            .output()
            .expect("python3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.trim() == "LLAMA", "{extra:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The llama3 fixture, which decodes a few hundred tokens a second on CI: a stream of 50,000
/// tokens from it outlasts any test, so a test controls when its running sequence ends.
fn llama3_fixture() -> String {
    root().join("tests/fixtures/llama3/llama3-bf16.gguf").to_str().unwrap().to_owned()
}

/// Sends a completion request over a raw connection, which the caller drops to abandon it.
fn send(server: &Server, body: &str) -> std::net::TcpStream {
    use std::io::Write;
    let address = server.base_url.trim_start_matches("http://").trim_end_matches("/v1");
    let mut client = std::net::TcpStream::connect(address).unwrap();
    write!(client, "POST /v1/completions HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    client
}

/// Starts a 50,000-token stream from [`llama3_fixture`] and returns once its first token came:
/// from then on the batch has a sequence running until the caller drops the connection.
fn start_long_stream(server: &Server) -> std::net::TcpStream {
    let running = send(server, r#"{"model": "llama3-bf16", "prompt": "Once", "max_tokens": 50000, "ignore_eos": true, "stream": true}"#);
    let mut stream = BufReader::new(running.try_clone().unwrap()).lines();
    assert!(stream.any(|line| line.unwrap().starts_with("data: {")), "the stream starts");
    running
}

/// The server's log once it contains `needle` (which the engine thread may write after the
/// answer that the test waited for), or after 30 s.
fn wait_for_log(server: &Server, needle: &str) -> String {
    wait_for_lines(server, needle, 1)
}

/// [`wait_for_log`] until `count` lines name `needle`: a request's log line may come after its
/// answer.
fn wait_for_lines(server: &Server, needle: &str, count: usize) -> String {
    for _ in 0..1500 {
        if server.log.lock().unwrap().matches(needle).count() >= count {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    server.log.lock().unwrap().clone()
}

/// With one sequence running and room for no other, requests beyond the one `--max-queued`
/// lets wait are refused with 503 `server_overloaded` at once; the one that waits is answered
/// when the running sequence ends.
#[test]
fn an_overloaded_server_sheds_requests_with_503() {
    let model = llama3_fixture();
    let server = serve(&["--model", &model, "--threads", "1", "--max-tokens", "50000", "--max-batch-sequences", "1", "--max-queued", "1"]);
    let running = start_long_stream(&server);
    let (answers, answered) = std::sync::mpsc::channel();
    for _ in 0..4 {
        let (base_url, answers) = (server.base_url.clone(), answers.clone());
        std::thread::spawn(move || answers.send(post(&base_url, "/v1/completions", r#"{"model": "llama3-bf16", "prompt": "Twice", "max_tokens": 2}"#)));
    }
    let timeout = Duration::from_secs(60);
    for _ in 0..3 {
        let (status, body) = answered.recv_timeout(timeout).expect("a refusal while the stream runs");
        assert_eq!((status, &body["error"]["type"]), (503, &serde_json::json!("server_overloaded")), "{body}");
    }
    drop(running);
    let (status, body) = answered.recv_timeout(timeout).expect("the waiting request's answer");
    assert_eq!(status, 200, "{body}");
}

/// A client that goes away before its JSON answer stops the generation (which would otherwise
/// run to `max_tokens`, a row of the batch and its share of every step).
#[test]
fn an_abandoned_request_stops_its_generation() {
    let model = llama3_fixture();
    let server = serve(&["--model", &model, "--threads", "1", "--max-tokens", "50000"]);
    let short = r#"{"model": "llama3-bf16", "prompt": "Once", "max_tokens": 2}"#;
    // The model loads on the first request: one dropped while it loads never generates.
    assert_eq!(post(&server.base_url, "/v1/completions", short).0, 200);
    let client = send(&server, r#"{"model": "llama3-bf16", "prompt": "Once", "max_tokens": 50000, "ignore_eos": true}"#);
    std::thread::sleep(Duration::from_millis(500));
    drop(client);
    let (status, answer) = post(&server.base_url, "/v1/completions", short);
    assert_eq!(status, 200, "{answer}");
    let log = wait_for_log(&server, "the request was abandoned");
    assert!(log.contains("the request was abandoned"), "{log}");
}

/// A request that comes while another generates joins its batch and is answered while the
/// first still streams: its `completed` line is the server's only one. (One batch at a time
/// would answer it after the first request's line.)
#[test]
fn a_request_joins_a_running_batch() {
    let model = llama3_fixture();
    let server = serve_logging(&["--model", &model, "--threads", "1", "--max-tokens", "50000"], "info");
    let running = start_long_stream(&server);
    let (status, answer) = post(&server.base_url, "/v1/completions", r#"{"model": "llama3-bf16", "prompt": "Twice", "max_tokens": 3, "ignore_eos": true}"#);
    assert_eq!((status, &answer["usage"]["completion_tokens"]), (200, &serde_json::json!(3)), "{answer}");
    let log = wait_for_log(&server, "completed");
    assert!(log.matches("completed").count() == 1 && log.contains("completion_tokens=3"), "{log}");
    drop(running);
}

/// Two conversations that take turns each find their earlier turn in the prompt cache; with
/// `--prompt-cache-mib 0` it keeps the last request's only, and a conversation's next turn
/// finds only the begin-of-text token the other conversation shares.
#[test]
fn conversations_taking_turns_find_their_earlier_turns() {
    let model = llama3_fixture();
    for (mib, reused) in [("256", true), ("0", false)] {
        let server = serve_logging(&["--model", &model, "--threads", "1", "--prompt-cache-mib", mib], "info");
        let complete = |prompt: &str| {
            let body = serde_json::json!({"model": "llama3-bf16", "prompt": prompt, "max_tokens": 4, "ignore_eos": true, "temperature": 0});
            let (status, answer) = post(&server.base_url, "/v1/completions", &body.to_string());
            assert_eq!(status, 200, "{answer}");
            (answer["choices"][0]["text"].as_str().unwrap().to_string(), answer["usage"]["prompt_tokens"].as_u64().unwrap())
        };
        let first = "A long and winding first conversation about rivers and their names";
        let (completion, first_tokens) = complete(first);
        complete("Another conversation entirely, about mountains");
        complete(&format!("{first}{completion} and more"));
        let log = wait_for_lines(&server, "completed", 3);
        let cached: Vec<u64> = log
            .lines()
            .filter(|line| line.contains("completed"))
            .map(|line| line.split("cached_prompt_tokens=").nth(1).and_then(|rest| rest.split(' ').next()).unwrap().parse().unwrap())
            .collect();
        assert_eq!(cached.len(), 3, "{log}");
        match reused {
            true => assert!(cached[2] >= first_tokens - 1, "budget {mib}: {cached:?} of a first turn of {first_tokens}\n{log}"),
            false => assert_eq!(cached[2], 1, "budget {mib}\n{log}"),
        }
    }
}

/// A request whose client goes away while it waits for room frees its place in the queue at
/// once: with one sequence running and one place to wait, the next request waits (it is not
/// refused) and is answered when the running one ends.
#[test]
fn a_request_dropped_while_it_waits_frees_its_place() {
    let model = llama3_fixture();
    let server = serve(&["--model", &model, "--threads", "1", "--max-tokens", "50000", "--max-batch-sequences", "1", "--max-queued", "1"]);
    let running = start_long_stream(&server);
    let waiting = send(&server, r#"{"model": "llama3-bf16", "prompt": "Twice", "max_tokens": 2}"#);
    std::thread::sleep(Duration::from_millis(300));
    drop(waiting);
    std::thread::sleep(Duration::from_millis(300));
    let next = std::thread::spawn({
        let base_url = server.base_url.clone();
        move || post(&base_url, "/v1/completions", r#"{"model": "llama3-bf16", "prompt": "Thrice", "max_tokens": 2}"#)
    });
    std::thread::sleep(Duration::from_millis(300));
    drop(running);
    let (status, answer) = next.join().unwrap();
    assert_eq!(status, 200, "{answer}");
}

/// A model whose chat template allocates without bound (a list concatenated with itself 40
/// times, which minijinja materializes before charging fuel): the chat request gets a 400 from
/// the template's bounded renderer, and the server goes on serving with its memory intact.
#[cfg(target_os = "linux")]
#[test]
fn a_hostile_chat_template_is_a_400_and_the_server_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("hostile");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(root().join("tests/fixtures/llama3/hf")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let bomb = "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}";
    std::fs::write(model.join("chat_template.jinja"), bomb).unwrap();
    let server = serve(&["--model", model.to_str().unwrap(), "--threads", "1"]);
    let (status, body) =
        post(&server.base_url, "/v1/chat/completions", r#"{"model": "hostile", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("renderer"), "{body}");
    let (status, body) = post(&server.base_url, "/v1/completions", r#"{"model": "hostile", "prompt": "Once", "max_tokens": 2}"#);
    assert_eq!(status, 200, "{body}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let peak_kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap();
    assert!(peak_kib < 512 << 10, "the server's own peak memory: {peak_kib} KiB");
}
