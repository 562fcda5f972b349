//! A TCP proxy in front of the local S3 server that can cut connections mid-transfer and play
//! dead, to test what the production client does when S3 fails halfway through.

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
}

#[derive(Debug)]
struct State {
    fault: Fault,
    /// Bytes left before the cut, once the triggering request has been seen.
    countdown: Option<u64>,
    /// Connections cut so far.
    cuts: usize,
}

pub struct FaultProxy {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let endpoint = format!("http://{}", listener.local_addr().expect("proxy address"));
        let state = Arc::new(Mutex::new(State { fault: Fault::None, countdown: None, cuts: 0 }));
        let upstream = upstream.to_string();
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                let pumps = [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())];
                for (from, to) in pumps {
                    if let (Ok(from), Ok(to)) = (from, to) {
                        let state = shared.clone();
                        std::thread::spawn(move || pump(from, to, &state));
                    }
                }
            }
        });
        Self { endpoint, state }
    }

    pub fn set(&self, fault: Fault) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *state = State { fault, countdown: None, cuts: state.cuts };
    }

    /// How many connections have been cut.
    pub fn cuts(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).cuts
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

/// Copies `from` to `to` until either side closes or the fault says to cut.
fn pump(mut from: TcpStream, mut to: TcpStream, state: &Mutex<State>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (forward, cut) = decide(state, &buf[..n]);
        if forward > 0 && to.write_all(&buf[..forward]).is_err() {
            break;
        }
        if cut {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// How much of `chunk` to forward, and whether to cut the connection after it.
fn decide(state: &Mutex<State>, chunk: &[u8]) -> (usize, bool) {
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    match s.fault {
        Fault::None => (chunk.len(), false),
        Fault::Down => {
            s.cuts += 1;
            (0, true)
        }
        Fault::CutAfter { method, bytes, then_down } => {
            if s.countdown.is_none() && chunk.starts_with(method) {
                s.countdown = Some(bytes);
            }
            match s.countdown {
                Some(left) if (chunk.len() as u64) >= left => {
                    s.cuts += 1;
                    s.fault = if then_down { Fault::Down } else { Fault::None };
                    s.countdown = None;
                    (left as usize, true)
                }
                Some(left) => {
                    s.countdown = Some(left - chunk.len() as u64);
                    (chunk.len(), false)
                }
                None => (chunk.len(), false),
            }
        }
    }
}
