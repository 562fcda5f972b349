//! The inference function: the router with what Lambda adds to each request (its request id
//! and deadline). `main.rs` reads the configuration from the environment
//! ([`llm_api::state_from_env`]) and runs it under lambda_http with response streaming.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::extract::Request;
use axum::Router;
use lambda_http::RequestExt;
use llm_api::{AppState, Deadline, RequestId};

/// The API router, with each invocation's request id and deadline handed to it.
pub fn app(state: Arc<AppState>) -> Router {
    llm_api::router(state).layer(axum::middleware::map_request(invocation))
}

async fn invocation(mut request: Request) -> Request {
    if let Some(context) = request.lambda_context_ref() {
        let id = RequestId(context.request_id.clone());
        let deadline = llm_observe::invocation_deadline(context.deadline)
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .map(|left| Deadline(Instant::now() + left));
        request.extensions_mut().insert(id);
        if let Some(deadline) = deadline {
            request.extensions_mut().insert(deadline);
        }
    }
    request
}
