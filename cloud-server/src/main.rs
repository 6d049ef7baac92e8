//! `cloud-server`: the server (`serve`), a standalone job worker (`worker`), database
//! migration (`migrate`), offline credential management (`token`, `fleet`) and a gRPC client
//! for developers and operators (`client`).
mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    // Before any thread or tensor exists (see the function's docs for the measurement).
    adaptivenet_kernels::alloc::retain_freed_memory();
    let args = cli::Args::parse();
    // Thread pools are sized from the environment on first use: before any thread starts.
    cli::apply_threads(&args)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: cli::Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .json()
        .with_writer(std::io::stderr)
        .init();
    cli::run(args).await
}
