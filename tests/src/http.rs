//! A minimal HTTP/1.1 client over a TCP socket: enough to call the API (and see raw status
//! lines and server-sent events) without another HTTP stack in the build.

use std::io::{Read, Write};

/// `POST path` with a JSON body to `address` (`host:port`); returns the status and the body.
pub fn post(address: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap_or_else(|e| panic!("connect {address}: {e}"));
    stream.set_read_timeout(Some(std::time::Duration::from_secs(120))).expect("read timeout");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let response = String::from_utf8_lossy(&response);
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line: {response}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    (status, if chunked { dechunk(body) } else { body.to_string() })
}

/// The payload of a `Transfer-Encoding: chunked` body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
    out
}

/// Serves the model at `uri` with the production router on a free local port, in a thread of
/// its own; returns `host:port`.
pub fn serve(uri: &str, settings: llm_api::model_source::DownloadSettings) -> String {
    use llm_api::{model_source, AppState, Limits, ModelSlot};
    let loader = model_source::loader(uri, llm_engine::LoadOptions::default(), settings).expect("loader");
    let state = std::sync::Arc::new(AppState::new(ModelSlot::new(model_source::model_id(uri), loader), Limits::default(), None));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(listener, llm_api::router(state)).await.expect("serve");
        });
    });
    address
}
