//! Oracle upload (streamed with a progress bar) and the catalogue listings.
use std::path::PathBuf;

use adaptivenet_proto::v1 as pb;
use anyhow::Context;
use sha2::{Digest, Sha256};

use super::Client;

pub(super) async fn upload(
    c: &mut Client,
    weights: PathBuf,
    arch: PathBuf,
    name: String,
    quiet: bool,
) -> anyhow::Result<()> {
    let data = std::fs::read(&weights).with_context(|| weights.display().to_string())?;
    let arch_json = std::fs::read(&arch).with_context(|| arch.display().to_string())?;
    let sha = hex::encode(Sha256::digest(&data));
    let bar = indicatif::ProgressBar::new(data.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
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
    let stream = futures::stream::iter(std::iter::once(header).chain(chunks.into_iter().map(
        move |c| {
            bar2.inc(c.len() as u64);
            pb::UploadOracleRequest {
                msg: Some(pb::upload_oracle_request::Msg::Chunk(c)),
            }
        },
    )));
    let r = c.upload_oracle(stream).await?.into_inner();
    bar.finish();
    let o = r.oracle.unwrap_or_default();
    if quiet {
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
    Ok(())
}

/// `list oracles|datasets|jobs|supernets`.
pub(super) async fn list(c: &mut Client, what: &str) -> anyhow::Result<()> {
    match what {
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
    }
    Ok(())
}
