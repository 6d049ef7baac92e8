//! `StartElastification` refuses, before anything is queued, what a worker would refuse: no
//! dataset (INVALID_ARGUMENT naming `dataset_id`, as `StartOracleTraining` does), bad
//! `params_json` (INVALID_ARGUMENT naming `params_json.KEY`) and a dataset that does not fit
//! the oracle (FAILED_PRECONDITION naming both). Real gRPC, real uploads, SQLite and
//! PostgreSQL; after every refusal `ListJobs` is still empty, and a good request still queues.
mod common;

use std::path::Path;

use adaptivenet_cloud::datasets::DatasetFormat;
use adaptivenet_cloud::domain::Role;
use adaptivenet_core::artifact::params_to_safetensors;
use adaptivenet_core::model::{ArchDescriptor, Model};
use adaptivenet_proto::v1 as pb;
use common::*;
use tonic::Code;

/// `root/<class>/<i>.png`: 3 classes x 20 images of `side`x`side`, colour or grey.
fn write_folder(root: &Path, side: u32, colour: bool) {
    for (ci, class) in ["a", "b", "c"].iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..20u32 {
            let v = |x: u32, y: u32| ((x * 13 + y * 7 + i * 3) as u8).wrapping_add(ci as u8 * 80);
            let p = dir.join(format!("{i:02}.png"));
            if colour {
                image::RgbImage::from_fn(side, side, |x, y| image::Rgb([v(x, y), 40, ci as u8]))
                    .save(p)
                    .unwrap();
            } else {
                image::GrayImage::from_fn(side, side, |x, y| image::Luma([v(x, y)]))
                    .save(p)
                    .unwrap();
            }
        }
    }
}

/// Uploads the folder `dir` as an ImageFolder dataset; returns the dataset id.
async fn upload_folder(h: &Harness, token: &str, name: &str, dir: &Path) -> String {
    let r = upload_dataset_dir(h, token, name, DatasetFormat::ImageFolder, dir)
        .await
        .expect("upload dataset");
    assert!(r.created, "{name}: new content");
    r.dataset.expect("dataset").id
}

/// Uploads a freshly initialised `adaptivenet.resnet_small` with four one-block stages of
/// width 8 (strides 1, 2, 2, 2: the input is reduced 8-fold), as a canonical chain
/// descriptor; returns the oracle id.
async fn upload_oracle(h: &Harness, token: &str, name: &str, cin: usize, classes: usize) -> String {
    let family = format!(
        r#"{{"family":"adaptivenet.resnet_small","block":"basic","layers":[1,1,1,1],"widths":[8,8,8,8],"in_channels":{cin},"num_classes":{classes}}}"#
    );
    let spec = ArchDescriptor::from_json(family.as_bytes()).unwrap().spec;
    let model = Model::init(&spec, 3).unwrap();
    let arch = serde_json::to_vec(&ArchDescriptor::chain(spec).raw).unwrap();
    let weights = params_to_safetensors(model.canonical_tensors()).unwrap();
    upload_arch(h, token, name, &arch, &weights)
        .await
        .expect("upload oracle")
        .id
}

async fn start(
    h: &Harness,
    token: &str,
    oracle_id: &str,
    dataset_id: &str,
    params: &str,
) -> Result<pb::Job, tonic::Status> {
    h.developer()
        .start_elastification(authed(
            pb::StartElastificationRequest {
                oracle_id: oracle_id.into(),
                dataset_id: dataset_id.into(),
                supernet_name: String::new(),
                params_json: params.into(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn jobs(h: &Harness, token: &str) -> Vec<pb::Job> {
    h.developer()
        .list_jobs(authed(pb::ListJobsRequest::default(), token))
        .await
        .expect("list jobs")
        .into_inner()
        .jobs
}

async fn refusals(db: Db) {
    let Some(h) = Harness::start(db, |_| {}, None).await else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let tmp = tempfile::tempdir().unwrap();
    let folder = |name: &str, side: u32, colour: bool| {
        let d = tmp.path().join(name);
        write_folder(&d, side, colour);
        d
    };
    let rgb = upload_folder(&h, &dev, "rgb", &folder("rgb", 16, true)).await;
    let grey = upload_folder(&h, &dev, "grey", &folder("grey", 16, false)).await;
    let tiny = upload_folder(&h, &dev, "tiny", &folder("tiny", 4, true)).await;
    let fits = upload_oracle(&h, &dev, "fits", 3, 3).await;
    let ten = upload_oracle(&h, &dev, "ten", 3, 10).await;
    let good = r#"{"branches":["merge2"],"stage0_steps":2,"stage1_steps":2,"batch":8,"val_size":12,"priors":4}"#;

    // No dataset: INVALID_ARGUMENT naming the field, before the oracle or the parameters
    // are looked at (an unknown oracle or bad parameters do not change the answer).
    let missing = uuid::Uuid::new_v4().to_string();
    for (oracle, params) in [
        (fits.as_str(), good),
        (fits.as_str(), ""),
        (fits.as_str(), r#"{"stage0_steps":-5}"#),
        (missing.as_str(), good),
    ] {
        let err = start(&h, &dev, oracle, "", params)
            .await
            .expect_err("no dataset");
        assert_eq!(err.code(), Code::InvalidArgument, "{params}: {err:?}");
        assert!(
            err.message().contains("dataset_id: required"),
            "{params}: {}",
            err.message()
        );
    }
    // Oracle training has the same rule.
    let err = h
        .developer()
        .start_oracle_training(authed(
            pb::StartOracleTrainingRequest {
                name: "tuned".into(),
                base_oracle_id: fits.clone(),
                ..Default::default()
            },
            &dev,
        ))
        .await
        .expect_err("no dataset");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("dataset_id: required"),
        "{}",
        err.message()
    );
    assert!(jobs(&h, &dev).await.is_empty(), "nothing was queued");

    // Bad parameters: INVALID_ARGUMENT naming the key.
    for (params, key) in [
        (r#"{"stage0_steps":-5}"#, "stage0_steps"),
        (r#"{"stage0_steps":0}"#, "stage0_steps"),
        (r#"{"stage1_steps":0}"#, "stage1_steps"),
        (r#"{"batch":0}"#, "batch"),
        (r#"{"batch":"64"}"#, "batch"),
        (r#"{"lr_stage0":-1}"#, "lr_stage0"),
        (r#"{"lr_stage0":"NaN"}"#, "lr_stage0"),
        (r#"{"lr_stage1":0}"#, "lr_stage1"),
        (r#"{"temperature":0}"#, "temperature"),
        (r#"{"temperature":"inf"}"#, "temperature"),
        (r#"{"original_weight":-1}"#, "original_weight"),
        (r#"{"val_size":0}"#, "val_size"),
        (r#"{"priors":0}"#, "priors"),
        (r#"{"branches":["merge7"]}"#, "branches"),
        (r#"{"branches":"merge2"}"#, "branches"),
        (r#"{"branches":[]}"#, "branches"),
        (r#"{"seed":-1}"#, "seed"),
        (r#"{"epochs":3}"#, "epochs"),
        (r#"{"stage0_steps":2,"stage0":2}"#, "stage0"),
    ] {
        let err = start(&h, &dev, &fits, &rgb, params)
            .await
            .expect_err(params);
        assert_eq!(err.code(), Code::InvalidArgument, "{params}: {err:?}");
        assert!(
            err.message().contains(&format!("params_json.{key}:")),
            "{params}: {}",
            err.message()
        );
    }
    // A named branch kind that fits no block of this oracle (merge3 would span two strides);
    // the default kinds (merge2, merge3) would apply merge2 only and queue.
    let err = start(&h, &dev, &fits, &rgb, r#"{"branches":["merge3"]}"#)
        .await
        .expect_err("merge3");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("params_json.branches: oracle 'fits': merge3 does not fit"),
        "{}",
        err.message()
    );
    // `val_size` must leave training images (60 in each dataset here).
    let err = start(
        &h,
        &dev,
        &fits,
        &rgb,
        r#"{"val_size":60,"branches":["merge2"]}"#,
    )
    .await
    .expect_err("val_size");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("params_json.val_size")
            && err
                .message()
                .contains("60 training images of dataset 'rgb'"),
        "{}",
        err.message()
    );

    // Datasets that do not fit the oracle: FAILED_PRECONDITION naming both sides.
    for (oracle, dataset, needles) in [
        (
            &fits,
            &grey,
            ["dataset 'grey' has 1 channel(s)", "oracle 'fits' expects 3"],
        ),
        (
            &ten,
            &rgb,
            [
                "dataset 'rgb' has 3 class(es)",
                "oracle 'ten' has a head for 10",
            ],
        ),
        (
            &fits,
            &tiny,
            [
                "dataset 'tiny' has 4x4 inputs",
                "oracle 'fits' needs at least 8x8",
            ],
        ),
    ] {
        let err = start(&h, &dev, oracle, dataset, good)
            .await
            .expect_err(needles[0]);
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        for n in needles {
            assert!(err.message().contains(n), "{n}: {}", err.message());
        }
    }
    assert!(jobs(&h, &dev).await.is_empty(), "nothing was queued");

    // A request that fits is queued.
    let job = start(&h, &dev, &fits, &rgb, good)
        .await
        .expect("good request");
    assert_eq!(job.state, pb::JobState::Queued as i32);
    let listed = jobs(&h, &dev).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, job.id);
    assert_eq!(listed[0].dataset_id, rgb);
    h.finish().await;
}
both_backends!(refusals_db, refusals);
