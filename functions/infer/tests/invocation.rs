//! What Lambda adds to a request reaches the router: with the invocation's deadline near,
//! generation stops early and the answer says `finish_reason: "length"`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use lambda_http::{Context, RequestExt};
use llm_api::model_source::{self, DownloadSettings};
use llm_api::{AppState, Limits, ModelSlot};
use tower::ServiceExt;

const REQUEST: &str = r#"{"model": "llama2-q8_0", "prompt": "hello world", "max_tokens": 8, "temperature": 0}"#;

fn app() -> axum::Router {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/llama2/llama2-q8_0.gguf");
    let loader = model_source::loader(path, Default::default(), DownloadSettings::default()).unwrap();
    let limits = Limits { deadline_margin: Duration::from_millis(1000), ..Limits::default() };
    infer_function::app(std::sync::Arc::new(AppState::new(ModelSlot::new("llama2-q8_0", loader), limits, None)))
}

/// An invocation whose deadline is `left` from now.
fn invoke(app: axum::Router, left: Duration) -> serde_json::Value {
    let mut context = Context::default();
    context.request_id = "test-request".into();
    context.deadline = (SystemTime::now() + left).duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let request =
        axum::http::Request::post("/v1/completions").header("content-type", "application/json").body(Body::from(REQUEST)).unwrap().with_lambda_context(context);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    })
}

#[test]
fn generation_stops_before_the_invocation_deadline() {
    let app = app();
    let relaxed = invoke(app.clone(), Duration::from_secs(600));
    assert_eq!((relaxed["usage"]["completion_tokens"].as_u64(), relaxed["choices"][0]["finish_reason"].as_str()), (Some(8), Some("length")));
    // Inside the margin already: one token is made, then generation stops.
    let rushed = invoke(app, Duration::from_millis(500));
    assert_eq!(rushed["usage"]["completion_tokens"], 1, "{rushed}");
    assert_eq!(rushed["choices"][0]["finish_reason"], "length");
    assert!(relaxed["choices"][0]["text"].as_str().unwrap().starts_with(rushed["choices"][0]["text"].as_str().unwrap()));
}
