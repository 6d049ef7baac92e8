//! `cloud-server`: the server (`serve`), a standalone job worker (`worker`), database
//! migration (`migrate`), offline credential management (`token`, `fleet`) and a gRPC client
//! for developers and operators (`client`).
mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    // Before any thread or tensor exists (see the function's docs for the measurement).
    adaptivenet_kernels::alloc::retain_freed_memory();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = cli::Args::parse();
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
