//! Dataset commands: upload (packed and streamed with a progress bar), register in place,
//! show and delete.
use std::path::PathBuf;

use adaptivenet_proto::v1 as pb;
use anyhow::Context;
use clap::Args;

use super::Client;

/// Preprocessing chosen by the developer; everything else is computed by the server.
#[derive(Args, Debug)]
pub(super) struct DatasetOptionArgs {
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
    pub(super) fn to_pb(&self) -> anyhow::Result<pb::DatasetOptions> {
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

pub(super) async fn upload(
    c: &mut Client,
    dir: PathBuf,
    name: Option<String>,
    format: Option<String>,
    options: DatasetOptionArgs,
    quiet: bool,
) -> anyhow::Result<()> {
    let r = upload_dataset(c, dir, name, format, options.to_pb()?).await?;
    let d = r.dataset.unwrap_or_default();
    if quiet {
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
    Ok(())
}

pub(super) async fn register(
    c: &mut Client,
    name: String,
    uri: String,
    format: String,
    num_samples: u64,
    options: DatasetOptionArgs,
    quiet: bool,
) -> anyhow::Result<()> {
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
    if quiet {
        println!("{}", d.id);
    } else {
        println!("dataset {} ({})", d.id, d.uri);
    }
    Ok(())
}

pub(super) async fn get(c: &mut Client, dataset_id: String) -> anyhow::Result<()> {
    let d = c
        .get_dataset(pb::GetDatasetRequest { dataset_id })
        .await?
        .into_inner();
    print_dataset(&d);
    Ok(())
}

pub(super) async fn delete(c: &mut Client, dataset_id: String) -> anyhow::Result<()> {
    c.delete_dataset(pb::DeleteDatasetRequest {
        dataset_id: dataset_id.clone(),
    })
    .await?;
    println!("deleted dataset {dataset_id}");
    Ok(())
}
