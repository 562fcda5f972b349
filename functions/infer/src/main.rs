//! Runs the OpenAI-compatible router under the Lambda runtime with response streaming. Nothing
//! is loaded here: the first request loads the model, later invocations reuse it.

fn main() -> Result<(), lambda_http::Error> {
    llm_observe::init_logging("info");
    llm_engine::threads::configure(llm_observe::lambda_cpu_share())?;
    let state = llm_api::state_from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(lambda_http::run_with_streaming_response(infer_function::app(state)))
}
