use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = llm_cli::Cli::parse();
    match llm_cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
