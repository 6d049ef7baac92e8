//! `cloud-server client ...`: the developer/operator client over the public gRPC API.
use std::path::PathBuf;
use std::time::Duration;

use adaptivenet_proto::v1 as pb;
use adaptivenet_proto::v1::developer_service_client::DeveloperServiceClient;
use anyhow::Context;
use clap::{Args, Subcommand};
use sha2::{Digest, Sha256};
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
    /// Point a fleet's label at a supernet version.
    Publish {
        supernet_id: String,
        #[arg(long)]
        fleet: String,
        #[arg(long, default_value = "stable")]
        label: String,
    },
}

/// Preprocessing chosen by the developer; everything else is computed by the server.
#[derive(Args, Debug)]
struct DatasetOptionArgs {
    /// Flip training images left-right at random (never for digits, text or signs).
    #[arg(long)]
    hflip: bool,
    /// Zero padding before a random crop back to the input size (0: no crop).
    #[arg(long, default_value_t = 0)]
    crop_padding: u32,
    /// Per-channel mean of x/255, comma-separated (default: computed on the training split).
    #[arg(long, value_delimiter = ',')]
    mean: Vec<f32>,
    /// Per-channel std of x/255, comma-separated (default: computed on the training split).
    #[arg(long, value_delimiter = ',')]
    std: Vec<f32>,
    /// Model input size `HxW` (default: the most common image size).
    #[arg(long)]
    size: Option<String>,
}

impl DatasetOptionArgs {
    fn to_pb(&self) -> anyhow::Result<pb::DatasetOptions> {
        let (height, width) = match &self.size {
            None => (0, 0),
            Some(s) => {
                let (h, w) = s
                    .split_once('x')
                    .with_context(|| format!("--size {s}: expected HxW, e.g. 32x32"))?;
                (
                    h.parse().with_context(|| format!("--size {s}"))?,
                    w.parse().with_context(|| format!("--size {s}"))?,
                )
            }
        };
        Ok(pb::DatasetOptions {
            hflip: self.hflip,
            crop_padding: self.crop_padding,
            mean: self.mean.clone(),
            std: self.std.clone(),
            height,
            width,
        })
    }
}

/// Prints a dataset and what the server recorded about it.
fn print_dataset(d: &pb::Dataset) {
    println!(
        "dataset {} name {} format {} samples {}",
        d.id, d.name, d.format, d.num_samples
    );
    println!("  uri:        {}", d.uri);
    println!("  digest:     {}", d.digest);
    println!("  input_spec: {}", d.input_spec_json);
    println!("  augment:    {}", d.augment_json);
    println!("  summary:    {}", d.summary_json);
}

/// Packs `dir` and streams it (header, shards, manifest) with a progress bar.
async fn upload_dataset(
    c: &mut Client,
    dir: PathBuf,
    name: Option<String>,
    format: Option<String>,
    options: pb::DatasetOptions,
) -> anyhow::Result<pb::UploadDatasetResponse> {
    use adaptivenet_cloud::datasets::{pack, DatasetFormat};
    use pb::upload_dataset_request::Msg;
    let name = match name {
        Some(n) => n,
        None => dir
            .canonicalize()?
            .file_name()
            .and_then(|n| n.to_str())
            .context("--name: the directory has no usable name")?
            .to_string(),
    };
    let (files, dirs) = pack::scan_dir(&dir, None).with_context(|| dir.display().to_string())?;
    let format = match format.as_deref() {
        Some(f) => DatasetFormat::parse("--format", f)?,
        None if files
            .iter()
            .any(|(n, _)| n.starts_with("train-images-idx3-ubyte")) =>
        {
            DatasetFormat::Idx
        }
        None => DatasetFormat::ImageFolder,
    };
    let dir2 = dir.clone();
    let packed = tokio::task::spawn_blocking(move || {
        pack::pack(format, files, dirs, pack::DEFAULT_SHARD_BYTES)
    })
    .await?
    .with_context(|| dir2.display().to_string())?;
    let bar = indicatif::ProgressBar::new(packed.total_bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .expect("valid template"),
    );
    bar.set_message(format!(
        "{} files, {} shards",
        packed.manifest.entries.len(),
        packed.shards.len()
    ));
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadDatasetRequest>(4);
    let header = pb::UploadDatasetRequest {
        msg: Some(Msg::Header(pb::DatasetUploadHeader {
            name,
            format: format.as_str().to_string(),
            total_bytes: packed.total_bytes,
            options: Some(options),
        })),
    };
    let bar2 = bar.clone();
    let producer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let send = |m: Msg| {
            tx.blocking_send(pb::UploadDatasetRequest { msg: Some(m) })
                .map_err(|_| anyhow::anyhow!("upload stream closed by the server"))
        };
        tx.blocking_send(header)
            .map_err(|_| anyhow::anyhow!("upload stream closed by the server"))?;
        for s in &packed.shards {
            send(Msg::Shard(pb::DatasetShard {
                sha256: s.sha256.clone(),
                size_bytes: s.size,
            }))?;
            for f in &s.files {
                let bytes = std::fs::read(f).with_context(|| f.display().to_string())?;
                for c in bytes.chunks(1 << 20) {
                    send(Msg::Chunk(c.to_vec()))?;
                    bar2.inc(c.len() as u64);
                }
            }
        }
        for c in packed.manifest.canonical_json().chunks(1 << 20) {
            send(Msg::ManifestChunk(c.to_vec()))?;
        }
        Ok(())
    });
    let r = c
        .upload_dataset(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    bar.finish();
    let r = r?.into_inner();
    producer.await??;
    Ok(r)
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
    match args.cmd {
        ClientCmd::Upload {
            weights,
            arch,
            name,
        } => {
            let data = std::fs::read(&weights).with_context(|| weights.display().to_string())?;
            let arch_json = std::fs::read(&arch).with_context(|| arch.display().to_string())?;
            let sha = hex::encode(Sha256::digest(&data));
            let bar = indicatif::ProgressBar::new(data.len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("valid template"),
            );
            let header = pb::UploadOracleRequest {
                msg: Some(pb::upload_oracle_request::Msg::Header(
                    pb::OracleUploadHeader {
                        name,
                        arch_json,
                        size_bytes: data.len() as u64,
                        weights_sha256: sha,
                    },
                )),
            };
            let bar2 = bar.clone();
            let chunks: Vec<Vec<u8>> = data.chunks(1 << 20).map(|c| c.to_vec()).collect();
            let stream = futures::stream::iter(std::iter::once(header).chain(
                chunks.into_iter().map(move |c| {
                    bar2.inc(c.len() as u64);
                    pb::UploadOracleRequest {
                        msg: Some(pb::upload_oracle_request::Msg::Chunk(c)),
                    }
                }),
            ));
            let r = c.upload_oracle(stream).await?.into_inner();
            bar.finish();
            let o = r.oracle.unwrap_or_default();
            if args.quiet {
                println!("{}", o.id);
                return Ok(());
            }
            println!(
                "{} oracle {} ({} params, sha256 {})",
                if r.created { "created" } else { "existing" },
                o.id,
                o.num_params,
                o.weights_sha256
            );
        }
        ClientCmd::Desire {
            fleet,
            label,
            supernet,
            budget_fraction,
            hysteresis,
        } => {
            use pb::set_desired_state_request::Target;
            let target = match supernet {
                Some(id) => Target::SupernetId(id),
                None => Target::Label(label),
            };
            let d = c
                .set_desired_state(pb::SetDesiredStateRequest {
                    fleet_id: fleet,
                    target: Some(target),
                    budget: Some(pb::LatencyBudgetPolicy {
                        latency_budget_ms: 0.0,
                        budget_fraction,
                        hysteresis,
                    }),
                })
                .await?
                .into_inner();
            println!(
                "fleet {} -> supernet {} (generation {})",
                d.fleet_id, d.supernet_id, d.generation
            );
        }
        ClientCmd::UploadDataset {
            dir,
            name,
            format,
            options,
        } => {
            let r = upload_dataset(&mut c, dir, name, format, options.to_pb()?).await?;
            let d = r.dataset.unwrap_or_default();
            if args.quiet {
                println!("{}", d.id);
                return Ok(());
            }
            println!(
                "{} dataset {} ({} samples, digest {})",
                if r.created { "created" } else { "existing" },
                d.id,
                d.num_samples,
                d.digest
            );
            print_dataset(&d);
        }
        ClientCmd::RegisterDataset {
            name,
            uri,
            format,
            num_samples,
            options,
        } => {
            let d = c
                .register_dataset(pb::RegisterDatasetRequest {
                    name,
                    uri,
                    format,
                    num_samples,
                    options: Some(options.to_pb()?),
                })
                .await?
                .into_inner();
            if args.quiet {
                println!("{}", d.id);
            } else {
                println!("dataset {} ({})", d.id, d.uri);
            }
        }
        ClientCmd::GetDataset { dataset_id } => {
            let d = c
                .get_dataset(pb::GetDatasetRequest { dataset_id })
                .await?
                .into_inner();
            print_dataset(&d);
        }
        ClientCmd::DeleteDataset { dataset_id } => {
            c.delete_dataset(pb::DeleteDatasetRequest {
                dataset_id: dataset_id.clone(),
            })
            .await?;
            println!("deleted dataset {dataset_id}");
        }
        ClientCmd::Aggregates { fleet } => {
            let channel = ep.connect().await?;
            let value: MetadataValue<_> = format!("Bearer {}", args.token).parse()?;
            let mut d = adaptivenet_proto::v1::dashboard_service_client::DashboardServiceClient::with_interceptor(
                channel,
                move |mut req: tonic::Request<()>| {
                    req.metadata_mut().insert("authorization", value.clone());
                    Ok(req)
                },
            );
            let a = d
                .get_fleet_aggregates(pb::GetFleetAggregatesRequest { fleet_id: fleet })
                .await?
                .into_inner();
            println!(
                "devices: {} total, {} online, {} stale",
                a.devices_total, a.devices_online, a.devices_stale
            );
            if a.suppressed_groups > 0 {
                println!(
                    "suppressed (below the privacy floor): {} groups, {} devices",
                    a.suppressed_groups, a.suppressed_devices
                );
            }
            for g in a.groups {
                let dist = |d: Option<pb::Distribution>| {
                    d.map(|d| {
                        if d.extremes_suppressed {
                            format!("p50 {:.3} mean {:.3}", d.p50, d.mean)
                        } else {
                            format!(
                                "p50 {:.3} p90 {:.3} (min {:.3}, max {:.3})",
                                d.p50, d.p90, d.min, d.max
                            )
                        }
                    })
                    .unwrap_or_default()
                };
                println!(
                    "supernet {} class {:?}: {} devices, {:.0}% within budget",
                    g.supernet_id,
                    pb::DeviceClass::try_from(g.device_class).unwrap_or_default(),
                    g.devices,
                    100.0 * g.within_budget_fraction
                );
                println!("  latency p50 ms: {}", dist(g.latency_p50_ms));
                println!("  latency p95 ms: {}", dist(g.latency_p95_ms));
                println!("  quality:        {}", dist(g.quality));
                for sc in g.subnets {
                    println!("  subnet {:24} x{}", sc.subnet, sc.devices);
                }
            }
        }
        ClientCmd::Elastify {
            oracle_id,
            dataset_id,
            params,
            supernet_name,
            watch,
        } => {
            let j = c
                .start_elastification(pb::StartElastificationRequest {
                    oracle_id,
                    dataset_id,
                    supernet_name,
                    params_json: params,
                })
                .await?
                .into_inner();
            if !watch {
                println!("{}{}", if args.quiet { "" } else { "job " }, j.id);
            } else {
                if !args.quiet {
                    println!("job {}", j.id);
                }
                let j = watch_job(&mut c, j.id).await?;
                print_finished(&j, args.quiet)?;
            }
        }
        ClientCmd::TrainOracle {
            dataset,
            arch,
            from_oracle,
            name,
            params,
            watch,
        } => {
            let arch_json = match arch {
                Some(p) => std::fs::read_to_string(&p)
                    .with_context(|| format!("reading --arch {}", p.display()))?,
                None => String::new(),
            };
            let j = c
                .start_oracle_training(pb::StartOracleTrainingRequest {
                    name,
                    dataset_id: dataset,
                    arch_json,
                    base_oracle_id: from_oracle.unwrap_or_default(),
                    params_json: params,
                })
                .await?
                .into_inner();
            if !watch {
                println!("{}{}", if args.quiet { "" } else { "job " }, j.id);
            } else {
                if !args.quiet {
                    println!("job {}", j.id);
                }
                let j = watch_job(&mut c, j.id).await?;
                print_finished(&j, args.quiet)?;
            }
        }
        ClientCmd::Watch { job_id } => {
            let j = watch_job(&mut c, job_id).await?;
            print_finished(&j, args.quiet)?;
        }
        ClientCmd::Cancel { job_id } => {
            let j = c
                .cancel_job(pb::CancelJobRequest { job_id })
                .await?
                .into_inner();
            println!(
                "job {} state {:?}",
                j.id,
                pb::JobState::try_from(j.state).unwrap_or_default()
            );
        }
        ClientCmd::List { what } => match what.as_str() {
            "oracles" => {
                for o in c
                    .list_oracles(pb::ListOraclesRequest::default())
                    .await?
                    .into_inner()
                    .oracles
                {
                    println!(
                        "{}  {:20}  {:10}  {}",
                        o.id, o.name, o.family, o.weights_sha256
                    );
                }
            }
            "datasets" => {
                for d in c
                    .list_datasets(pb::ListDatasetsRequest::default())
                    .await?
                    .into_inner()
                    .datasets
                {
                    println!(
                        "{}  {:20}  {:12}  {:>8} samples  {}",
                        d.id, d.name, d.format, d.num_samples, d.digest
                    );
                }
            }
            "jobs" => {
                for j in c
                    .list_jobs(pb::ListJobsRequest::default())
                    .await?
                    .into_inner()
                    .jobs
                {
                    let st = pb::JobState::try_from(j.state).unwrap_or_default();
                    let result = if j.result_oracle_id.is_empty() {
                        &j.supernet_id
                    } else {
                        &j.result_oracle_id
                    };
                    println!(
                        "{}  {:12}  {:?}  {:.0}%  {}{}",
                        j.id,
                        j.kind,
                        st,
                        j.progress * 100.0,
                        result,
                        j.error
                    );
                }
            }
            _ => {
                for s in c
                    .list_supernets(pb::ListSupernetsRequest::default())
                    .await?
                    .into_inner()
                    .supernets
                {
                    println!(
                        "{}  {} v{}  {} modules",
                        s.id, s.name, s.version, s.num_modules
                    );
                }
            }
        },
        ClientCmd::Publish {
            supernet_id,
            fleet,
            label,
        } => {
            let l = c
                .publish_supernet(pb::PublishSupernetRequest {
                    supernet_id,
                    fleet_id: fleet,
                    label,
                })
                .await?
                .into_inner();
            println!("{} -> {} in fleet {}", l.label, l.supernet_id, l.fleet_id);
        }
    }
    Ok(())
}

/// Prints a finished job (with `quiet`, only its result's id) and fails unless it succeeded,
/// so that a script stops at a failed job.
fn print_finished(j: &pb::Job, quiet: bool) -> anyhow::Result<()> {
    let st = pb::JobState::try_from(j.state).unwrap_or_default();
    if st != pb::JobState::Succeeded {
        anyhow::bail!("job {} ended {:?}: {}", j.id, st, j.error);
    }
    // An oracle-training job's result is an oracle; an elastification's a supernet.
    let result = if j.kind == "train_oracle" {
        &j.result_oracle_id
    } else {
        &j.supernet_id
    };
    if quiet {
        println!("{result}");
    } else if j.kind == "train_oracle" {
        println!("job {} {:?} oracle {result}", j.id, st);
        if let Some(r) = train_report_summary(&j.report_json) {
            println!("{r}");
        }
    } else {
        println!("job {} {:?} {result}", j.id, st);
    }
    Ok(())
}

/// Follows a job with a progress bar (stderr) until it ends; returns its last snapshot.
async fn watch_job(c: &mut Client, job_id: String) -> anyhow::Result<pb::Job> {
    let mut s = c
        .watch_job(pb::WatchJobRequest { job_id })
        .await?
        .into_inner();
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {percent}% {msg}")
            .expect("valid template"),
    );
    let mut last = None;
    while let Some(ev) = s.message().await? {
        if let Some(j) = ev.job {
            bar.set_position((j.progress * 1000.0) as u64);
            bar.set_message(j.stage.clone());
            last = Some(j);
        }
    }
    bar.finish_and_clear();
    last.context("the job stream ended without a snapshot")
}

/// A train-oracle job's report as readable lines (None when there is none).
pub fn train_report_summary(report_json: &str) -> Option<String> {
    let r: serde_json::Value = serde_json::from_str(report_json).ok()?;
    let acc = match (r["accuracy"].as_f64(), r["accuracy_split"].as_str()) {
        (Some(a), Some(split)) => format!(
            "{:.2} % on {} {split} images",
            a * 100.0,
            r["accuracy_images"]
        ),
        _ => "not measured (nothing held out)".to_string(),
    };
    Some(format!(
        "  {} to {} classes: {} steps of batch {} at lr {} in {:.1} s, {:.0} images/s on {} threads\n  accuracy: {acc}\n  loss: {:.4} -> {:.4} (mean of the last steps)",
        r["mode"].as_str().unwrap_or("?"),
        r["classes"],
        r["steps"],
        r["batch"],
        r["lr"],
        r["train_seconds"].as_f64().unwrap_or(0.0),
        r["images_per_sec"].as_f64().unwrap_or(0.0),
        r["threads"],
        r["first_loss"].as_f64().unwrap_or(f64::NAN),
        r["final_mean_loss"].as_f64().unwrap_or(f64::NAN),
    ))
}
