//! The served model, loaded on first use and kept for later requests (warm Lambda
//! invocations). Concurrent first requests wait for one load; a failed load is reported as
//! 503 and retried by the next request, and a half-loaded model is never served.

use std::sync::Arc;
use std::time::Instant;

use llm_engine::LoadedModel;
use tokio::sync::Mutex;

use crate::error::ApiError;

/// A loaded model and where it came from (the S3 object or local path), for logs.
pub struct Loaded {
    pub model: LoadedModel,
    pub source: String,
}

/// Loads the model (blocking: downloads, parses, builds tensors).
pub type Loader = Arc<dyn Fn() -> Result<Loaded, String> + Send + Sync>;

pub struct ModelSlot {
    /// The name clients pass as `model`.
    pub id: String,
    loader: Loader,
    loaded: Mutex<Option<(Arc<LoadedModel>, Arc<str>)>>,
}

/// What [`ModelSlot::get`] did, for logs and metrics.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Milliseconds spent loading, when this call loaded the model.
    pub load_ms: Option<f64>,
    pub source: Arc<str>,
}

impl ModelSlot {
    pub fn new(id: impl Into<String>, loader: Loader) -> Self {
        Self { id: id.into(), loader, loaded: Mutex::new(None) }
    }

    /// The model, loading it first if no request has yet.
    pub async fn get(&self) -> Result<(Arc<LoadedModel>, LoadReport), ApiError> {
        let mut slot = self.loaded.lock().await;
        if let Some((model, source)) = slot.as_ref() {
            return Ok((model.clone(), LoadReport { load_ms: None, source: source.clone() }));
        }
        let started = Instant::now();
        let loader = self.loader.clone();
        let result = tokio::task::spawn_blocking(move || loader()).await.map_err(|e| ApiError::internal(format!("the model loader stopped: {e}")))?;
        match result {
            Ok(Loaded { model, source }) => {
                let model = Arc::new(model);
                let source: Arc<str> = source.into();
                *slot = Some((model.clone(), source.clone()));
                let load_ms = started.elapsed().as_secs_f64() * 1e3;
                let kv_cache = model.model.kv_cache_type().name();
                tracing::info!(model = %self.id, %source, load_ms, kv_cache, "model loaded");
                Ok((model, LoadReport { load_ms: Some(load_ms), source }))
            }
            Err(message) => {
                tracing::error!(model = %self.id, message, "model failed to load");
                Err(ApiError::unavailable(format!("The model `{}` could not be loaded: {message}", self.id)))
            }
        }
    }
}
