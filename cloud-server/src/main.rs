//! `cloud-server`: the server (`serve`), a standalone job worker (`worker`), database
//! migration (`migrate`), offline credential management (`token`, `fleet`) and a gRPC client
//! for developers and operators (`client`).
mod cli;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
