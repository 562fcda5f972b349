//! A TCP proxy in front of the local S3 server that can cut or stall connections mid-transfer,
//! answer with S3's error responses, and play dead, to test what the production client does
//! when S3 fails halfway through.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// The server is gone: every connection is closed as soon as it carries data.
    Down,
    /// Once a request starting with `method` (e.g. `b"PUT "`) is seen, forward `bytes` more
    /// bytes (either direction), then cut that connection; afterwards forward nothing
    /// (`then_down`: the server died) or everything (a one-off network fault).
    CutAfter { method: &'static [u8], bytes: u64, then_down: bool },
    /// Like a one-off `CutAfter`, but the connection stays open and carries nothing more (a
    /// stalled transfer: only the client's timeouts end it).
    StallAfter { method: &'static [u8], bytes: u64 },
    /// The next `times` requests are answered by the proxy with this status and S3 error code
    /// (e.g. 503 `SlowDown`, 500 `InternalError`) and never reach the server.
    Respond { status: u16, code: &'static str, times: usize },
}

/// What to do with a chunk of the transfer.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// Forward this many bytes of it and carry on.
    Forward(usize),
    /// Forward this many bytes, then close the connection.
    Cut(usize),
    /// Forward this many bytes, then nothing more, leaving the connection open.
    Stall(usize),
    /// Answer the request with this status and error code, then close the connection.
    Respond(u16, &'static str),
}

#[derive(Debug)]
struct State {
    fault: Fault,
    /// Bytes left before the cut, once the triggering request has been seen.
    countdown: Option<u64>,
    /// Connections cut so far.
    cuts: usize,
    /// Connections stalled so far.
    stalls: usize,
    /// Requests answered with an error response so far.
    errors: usize,
}

/// One of the proxy's counts of the faults it made: [`FaultProxy::cuts`], [`FaultProxy::stalls`], ...
pub type FaultCount = fn(&FaultProxy) -> usize;

pub struct FaultProxy {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let endpoint = format!("http://{}", listener.local_addr().expect("proxy address"));
        let state = Arc::new(Mutex::new(State { fault: Fault::None, countdown: None, cuts: 0, stalls: 0, errors: 0 }));
        let upstream = upstream.to_string();
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                // Requests flow from the client, which is also where error responses go.
                let pumps = [(client.try_clone(), server.try_clone(), client.try_clone().ok()), (server.try_clone(), client.try_clone(), None)];
                for (from, to, reply_to) in pumps {
                    if let (Ok(from), Ok(to)) = (from, to) {
                        let state = shared.clone();
                        std::thread::spawn(move || pump(from, to, reply_to, &state));
                    }
                }
            }
        });
        Self { endpoint, state }
    }

    pub fn set(&self, fault: Fault) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = State { fault, countdown: None, ..*state };
    }

    /// How many connections have been cut.
    pub fn cuts(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).cuts
    }

    /// How many connections have been stalled.
    pub fn stalls(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).stalls
    }

    /// How many requests have been answered with an error response.
    pub fn errors(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).errors
    }
}

/// The proxy of this test process, in front of its local S3 server; every S3 client made after
/// the first call goes through it.
pub fn proxied() -> &'static FaultProxy {
    static PROXY: std::sync::OnceLock<FaultProxy> = std::sync::OnceLock::new();
    PROXY.get_or_init(|| {
        let server = crate::local_s3::local_s3();
        let proxy = FaultProxy::start(server.endpoint.trim_start_matches("http://"));
        std::env::set_var("AWS_ENDPOINT_URL", &proxy.endpoint);
        proxy
    })
}

/// Tests of one process share the proxy's fault setting, so they hold this to run one at a time.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Copies `from` to `to` until either side closes or the fault says to cut; error responses
/// go to `reply_to` (the client, for the direction that carries requests).
fn pump(mut from: TcpStream, mut to: TcpStream, reply_to: Option<TcpStream>, state: &Mutex<State>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut stalled = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stalled {
            continue;
        }
        let action = decide(state, &buf[..n], reply_to.is_some());
        let forward = match action {
            Action::Respond(status, code) => {
                if let Some(mut client) = reply_to.as_ref() {
                    let _ = client.write_all(error_response(status, code).as_bytes());
                }
                break;
            }
            Action::Forward(n) | Action::Cut(n) | Action::Stall(n) => n,
        };
        if forward > 0 && to.write_all(&buf[..forward]).is_err() {
            break;
        }
        match action {
            Action::Cut(_) => break,
            Action::Stall(_) => stalled = true,
            _ => {}
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// What to do with `chunk`, which starts a request when `from_client` and it starts with a
/// method.
fn decide(state: &Mutex<State>, chunk: &[u8], from_client: bool) -> Action {
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    let request = from_client && [&b"GET "[..], b"PUT ", b"POST ", b"HEAD ", b"DELETE "].iter().any(|m| chunk.starts_with(m));
    match s.fault {
        Fault::None => Action::Forward(chunk.len()),
        Fault::Down => {
            s.cuts += 1;
            Action::Cut(0)
        }
        Fault::Respond { status, code, times } if request => {
            s.errors += 1;
            s.fault = if times > 1 { Fault::Respond { status, code, times: times - 1 } } else { Fault::None };
            Action::Respond(status, code)
        }
        Fault::Respond { .. } => Action::Forward(chunk.len()),
        Fault::CutAfter { method, bytes, .. } | Fault::StallAfter { method, bytes } => {
            if s.countdown.is_none() && chunk.starts_with(method) {
                s.countdown = Some(bytes);
            }
            match s.countdown {
                Some(left) if (chunk.len() as u64) >= left => {
                    let stall = matches!(s.fault, Fault::StallAfter { .. });
                    let then_down = matches!(s.fault, Fault::CutAfter { then_down: true, .. });
                    s.fault = if then_down { Fault::Down } else { Fault::None };
                    s.countdown = None;
                    if stall {
                        s.stalls += 1;
                        Action::Stall(left as usize)
                    } else {
                        s.cuts += 1;
                        Action::Cut(left as usize)
                    }
                }
                Some(left) => {
                    s.countdown = Some(left - chunk.len() as u64);
                    Action::Forward(chunk.len())
                }
                None => Action::Forward(chunk.len()),
            }
        }
    }
}

/// An S3 error response (`<Error><Code>…`) that closes the connection.
fn error_response(status: u16, code: &str) -> String {
    let body = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the fault proxy</Message><RequestId>fault</RequestId></Error>");
    format!("HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}
