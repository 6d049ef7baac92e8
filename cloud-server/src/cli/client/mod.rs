//! `cloud-server client ...`: the developer/operator client over the public gRPC API. This
//! module holds the flags, the connection (TLS, bearer token) and the dispatch; each command
//! group lives in its own module.
mod datasets;
mod fleet;
mod jobs;
mod oracles;
mod rollout;

use std::path::PathBuf;
use std::time::Duration;

use adaptivenet_proto::v1::developer_service_client::DeveloperServiceClient;
use anyhow::Context;
use clap::{Args, Subcommand};
use datasets::DatasetOptionArgs;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

#[derive(Args, Debug)]
pub struct ClientArgs {
    #[arg(
        long,
        env = "ADAPTIVENET_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
    /// CA certificate (PEM) that signed the server's certificate, for an `https://` endpoint
    /// (TLS needs a build with `--features tls`).
    #[arg(long, env = "ADAPTIVENET_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a server that requires mutual TLS (`--tls-client-ca`).
    #[arg(long, requires = "tls_key", requires = "ca_file")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// API token (`anv1_api_...`).
    #[arg(long, env = "ADAPTIVENET_TOKEN")]
    token: String,
    /// Print only the id of what the command made (the oracle, the dataset, the job; with
    /// `--watch`, the job's result), for scripts: `ORACLE=$(cloud-server client -q upload ...)`.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: ClientCmd,
}

#[derive(Subcommand, Debug)]
enum ClientCmd {
    /// Upload an oracle (safetensors weights + architecture JSON) with a progress bar.
    Upload {
        weights: PathBuf,
        #[arg(long)]
        arch: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Upload a dataset directory (ImageFolder tree or IDX folder) with a progress bar; the
    /// server validates every entry before storing anything. Same content: same dataset.
    UploadDataset {
        dir: PathBuf,
        /// Dataset name (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
        /// `imagefolder` (`<class>/<image>.png|jpg`) or `idx`; default: `idx` when the folder
        /// holds `train-images-idx3-ubyte[.gz]`, else `imagefolder`.
        #[arg(long, value_parser = ["imagefolder", "idx"])]
        format: Option<String>,
        #[command(flatten)]
        options: DatasetOptionArgs,
    },
    /// Register a dataset the server reads in place (`file://` under its --dataset-root).
    RegisterDataset {
        #[arg(long)]
        name: String,
        /// `file://` URI (or absolute path) on the server, under its --dataset-root.
        #[arg(long)]
        uri: String,
        #[arg(long, default_value = "idx", value_parser = ["imagefolder", "idx"])]
        format: String,
        /// Ignored (the server counts samples itself); kept for old scripts.
        #[arg(long, default_value_t = 0, hide = true)]
        num_samples: u64,
        #[command(flatten)]
        options: DatasetOptionArgs,
    },
    /// Show what the server recorded about a dataset (input spec, augmentation, summary).
    GetDataset { dataset_id: String },
    /// Delete a dataset (refused while a queued or running job uses it).
    DeleteDataset { dataset_id: String },
    /// Start an elastification job, optionally watching it to the end.
    Elastify {
        oracle_id: String,
        #[arg(long, default_value = "")]
        dataset_id: String,
        /// Runner parameters as a JSON object, e.g. '{"stage0_steps":50,"stage1_steps":50}'
        /// (fields: branches, seed, stage0_steps, stage1_steps, batch, lr_stage0, lr_stage1,
        /// temperature, checkpoint_every, val_size, priors, max_train_images).
        #[arg(long, default_value = "")]
        params: String,
        /// Name of the resulting supernet (default: the oracle's name).
        #[arg(long, default_value = "")]
        supernet_name: String,
        #[arg(long)]
        watch: bool,
    },
    /// Train an oracle on a dataset in the cloud: from scratch (--arch) or fine-tuned from an
    /// uploaded oracle with a new head for the dataset's classes (--from-oracle). The result
    /// is a new oracle, ready to elastify.
    TrainOracle {
        #[arg(long)]
        dataset: String,
        /// Architecture descriptor JSON file (train from scratch).
        #[arg(
            long,
            conflicts_with = "from_oracle",
            required_unless_present = "from_oracle"
        )]
        arch: Option<std::path::PathBuf>,
        /// Oracle id to fine-tune.
        #[arg(long)]
        from_oracle: Option<String>,
        /// Name of the resulting oracle.
        #[arg(long)]
        name: String,
        /// Training parameters as a JSON object, e.g. '{"epochs":3,"lr":0.01}' (keys: steps
        /// or epochs, batch, lr, warmup_steps, weight_decay, seed, checkpoint_every,
        /// max_train_images, val_size). Defaults: fine-tuning 5 epochs at lr 0.02 with 0.2
        /// warm-up epochs; from scratch 20 epochs at lr 0.1 with 1; batch 128.
        #[arg(long, default_value = "")]
        params: String,
        #[arg(long)]
        watch: bool,
    },
    /// Set a fleet's desired state: follow a label (or pin a supernet) with a budget policy.
    Desire {
        #[arg(long)]
        fleet: String,
        /// Label to follow (e.g. `stable`); ignored with --supernet.
        #[arg(long, default_value = "stable")]
        label: String,
        /// Pin one supernet version instead of a label.
        #[arg(long)]
        supernet: Option<String>,
        /// Default budget as a fraction of the oracle's latency on each device.
        #[arg(long, default_value_t = 0.6)]
        budget_fraction: f64,
        #[arg(long, default_value_t = 0.1)]
        hysteresis: f64,
    },
    /// Fleet aggregates as a dashboard sees them (needs a viewer token or better).
    Aggregates {
        /// Restrict to one fleet (id).
        #[arg(long, default_value = "")]
        fleet: String,
    },
    /// Watch a job with a progress bar.
    Watch { job_id: String },
    /// Cancel a job.
    Cancel { job_id: String },
    /// List oracles, jobs or supernets.
    List {
        #[arg(value_parser = ["oracles", "datasets", "jobs", "supernets"])]
        what: String,
    },
    /// Staged rollouts of a new supernet version to a fleet (canary cohorts, metric gates,
    /// automatic promotion and rollback).
    #[command(subcommand)]
    Rollout(rollout::RolloutCmd),
    /// Point a fleet's label at a supernet version (every device follows at once; see
    /// `rollout start` for a staged move).
    Publish {
        supernet_id: String,
        #[arg(long)]
        fleet: String,
        #[arg(long, default_value = "stable")]
        label: String,
    },
}

/// Adds the bearer token to every call.
type AuthFn =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

type Client =
    DeveloperServiceClient<tonic::service::interceptor::InterceptedService<Channel, AuthFn>>;

/// The endpoint, with TLS trusting `--ca-file` (and presenting `--tls-cert` for mutual TLS)
/// when the URL is `https://`.
fn endpoint(args: &ClientArgs) -> anyhow::Result<Endpoint> {
    let (url, ca_file) = (args.endpoint.as_str(), args.ca_file.as_deref());
    let ep = Channel::from_shared(url.to_string())
        .with_context(|| format!("--endpoint {url}"))?
        .connect_timeout(Duration::from_secs(10));
    if !url.starts_with("https://") {
        if ca_file.is_some() {
            anyhow::bail!("--ca-file is for https:// endpoints, got {url}");
        }
        return Ok(ep);
    }
    #[cfg(feature = "tls")]
    {
        let ca = ca_file.context(
            "an https:// endpoint needs --ca-file (PEM of the CA that signed the server certificate)",
        )?;
        use super::{read_pem, Pem};
        let pem = read_pem("--ca-file", ca, Pem::Certificate)?;
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem));
        if let (Some(c), Some(k)) = (&args.tls_cert, &args.tls_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read_pem("--tls-cert", c, Pem::Certificate)?,
                read_pem("--tls-key", k, Pem::PrivateKey)?,
            ));
        }
        ep.tls_config(tls).context("TLS configuration")
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = (&args.tls_cert, &args.tls_key);
        anyhow::bail!("{url}: this build has no TLS support (rebuild with --features tls)")
    }
}

async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let (endpoint, token) = (&args.endpoint, &args.token);
    let channel = self::endpoint(args)?
        .connect()
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    let value: MetadataValue<_> = format!("Bearer {token}").parse()?;
    let f: AuthFn = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", value.clone());
        Ok(req)
    });
    Ok(DeveloperServiceClient::with_interceptor(channel, f).max_decoding_message_size(8 << 20))
}

pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let mut c = connect(&args).await?;
    let ep = endpoint(&args)?;
    let quiet = args.quiet;
    let c = &mut c;
    match args.cmd {
        ClientCmd::Upload {
            weights,
            arch,
            name,
        } => oracles::upload(c, weights, arch, name, quiet).await,
        ClientCmd::List { what } => oracles::list(c, &what).await,
        ClientCmd::UploadDataset {
            dir,
            name,
            format,
            options,
        } => datasets::upload(c, dir, name, format, options, quiet).await,
        ClientCmd::RegisterDataset {
            name,
            uri,
            format,
            num_samples,
            options,
        } => datasets::register(c, name, uri, format, num_samples, options, quiet).await,
        ClientCmd::GetDataset { dataset_id } => datasets::get(c, dataset_id).await,
        ClientCmd::DeleteDataset { dataset_id } => datasets::delete(c, dataset_id).await,
        ClientCmd::Elastify {
            oracle_id,
            dataset_id,
            params,
            supernet_name,
            watch,
        } => {
            jobs::elastify(
                c,
                oracle_id,
                dataset_id,
                params,
                supernet_name,
                watch,
                quiet,
            )
            .await
        }
        ClientCmd::TrainOracle {
            dataset,
            arch,
            from_oracle,
            name,
            params,
            watch,
        } => jobs::train_oracle(c, dataset, arch, from_oracle, name, params, watch, quiet).await,
        ClientCmd::Watch { job_id } => jobs::watch(c, job_id, quiet).await,
        ClientCmd::Cancel { job_id } => jobs::cancel(c, job_id).await,
        ClientCmd::Desire {
            fleet,
            label,
            supernet,
            budget_fraction,
            hysteresis,
        } => fleet::desire(c, fleet, label, supernet, budget_fraction, hysteresis).await,
        ClientCmd::Aggregates { fleet } => fleet::aggregates(ep, &args.token, fleet).await,
        ClientCmd::Publish {
            supernet_id,
            fleet,
            label,
        } => fleet::publish(c, supernet_id, fleet, label).await,
        ClientCmd::Rollout(cmd) => rollout::run(c, cmd, quiet).await,
    }
}
