//! An HTTP proxy in front of the local S3 server (or the local Batch server) that records each
//! request as the IAM action it needs and the resource it touches, so that a test can check the
//! template's policies against the calls the code really makes, not against what we think it
//! makes. Requests and responses are forwarded unchanged (signatures stay valid).

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// One authorisation an AWS request needs: `s3:GetObject` on `arn:aws:s3:::bucket/key`, or
/// `s3:ListBucket` on the bucket with the listed prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub action: String,
    pub resource: String,
    /// `s3:prefix`, for `s3:ListBucket`.
    pub prefix: Option<String>,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.action, self.resource)?;
        if let Some(prefix) = &self.prefix {
            write!(f, " (prefix {prefix})")?;
        }
        Ok(())
    }
}

pub struct RecordingProxy {
    pub endpoint: String,
    calls: Arc<Mutex<Vec<Call>>>,
    _runtime: tokio::runtime::Runtime,
}

#[derive(Clone)]
struct Shared {
    upstream: String,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl RecordingProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind proxy");
        let endpoint = format!("http://{}", listener.local_addr().expect("proxy address"));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared { upstream: upstream.trim_start_matches("http://").to_string(), calls: calls.clone() };
        let app = Router::new().fallback(forward).with_state(shared);
        runtime.spawn(async move { axum::serve(listener, app).await });
        Self { endpoint, calls, _runtime: runtime }
    }

    /// The calls recorded since the last `take`.
    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

async fn forward(State(shared): State<Shared>, request: Request) -> Result<Response, (StatusCode, String)> {
    let bad_gateway = |e: &dyn std::fmt::Display| (StatusCode::BAD_GATEWAY, e.to_string());
    let (parts, body) = request.into_parts();
    let request_body = axum::body::to_bytes(body, usize::MAX).await.map_err(|e| bad_gateway(&e))?;
    let (method, uri) = (parts.method.clone(), parts.uri.clone());
    let stream = tokio::net::TcpStream::connect(&shared.upstream).await.map_err(|e| bad_gateway(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| bad_gateway(&e))?;
    tokio::spawn(connection);
    let upstream_request = axum::http::Request::from_parts(parts, Full::new(request_body.clone()));
    let response = sender.send_request(upstream_request).await.map_err(|e| bad_gateway(&e))?;
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.map_err(|e| bad_gateway(&e))?.to_bytes();
    shared.calls.lock().unwrap_or_else(|e| e.into_inner()).extend(calls_of(&method, &uri, &request_body, parts.status));
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

/// What a request needs, by the rules of the S3 and Batch authorization references.
fn calls_of(method: &Method, uri: &Uri, body: &Bytes, status: StatusCode) -> Vec<Call> {
    let call = |action: &str, resource: String, prefix: Option<String>| Call { action: action.into(), resource, prefix };
    let path = uri.path();
    if let Some(operation) = path.strip_prefix("/v1/") {
        let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        return match operation {
            "submitjob" => ["jobQueue", "jobDefinition"]
                .iter()
                .map(|field| call("batch:SubmitJob", request[field].as_str().unwrap_or_default().to_string(), None))
                .collect(),
            // The REST path is the operation's name in lower case (IAM compares actions so).
            other => vec![call(&format!("batch:{other}"), "*".into(), None)],
        };
    }
    let query: Vec<(String, String)> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let has = |name: &str| query.iter().any(|(k, _)| k == name);
    let (bucket, key) = path.trim_start_matches('/').split_once('/').unwrap_or((path.trim_start_matches('/'), ""));
    let key = percent_decode(key);
    let bucket_arn = format!("arn:aws:s3:::{bucket}");
    let object_arn = format!("arn:aws:s3:::{bucket}/{key}");
    if key.is_empty() {
        let prefix = query.iter().find(|(k, _)| k == "prefix").map_or(String::new(), |(_, v)| v.clone());
        return match *method {
            Method::GET => vec![call("s3:ListBucket", bucket_arn, Some(prefix))],
            Method::PUT => vec![call("s3:CreateBucket", bucket_arn, None)],
            _ => vec![call(&format!("s3:{method}Bucket"), bucket_arn, None)],
        };
    }
    match *method {
        // Without s3:ListBucket, S3 answers a missing key with 403 instead of 404.
        Method::GET | Method::HEAD if status == StatusCode::NOT_FOUND => {
            vec![call("s3:GetObject", object_arn, None), call("s3:ListBucket", bucket_arn, Some(key))]
        }
        Method::GET | Method::HEAD => vec![call("s3:GetObject", object_arn, None)],
        Method::DELETE if has("uploadId") => vec![call("s3:AbortMultipartUpload", object_arn, None)],
        Method::DELETE => vec![call("s3:DeleteObject", object_arn, None)],
        // PutObject, UploadPart and Create/CompleteMultipartUpload all need s3:PutObject.
        Method::PUT | Method::POST => vec![call("s3:PutObject", object_arn, None)],
        _ => vec![call(&format!("s3:{method}"), object_arn, None)],
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%').then(|| text.get(i + 1..i + 3)).flatten().and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
