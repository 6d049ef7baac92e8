//! Datasets over real gRPC on SQLite and PostgreSQL: upload (the real CLI and hand-made
//! hostile streams), idempotence, validation with nothing stored on refusal, registration
//! under the dataset root only, materialisation, and deletion refused while a job uses it.
mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use adaptivenet_cloud::datasets::{self, pack, DatasetFormat};
use adaptivenet_cloud::domain::Role;
use adaptivenet_proto::v1 as pb;
use common::*;
use tonic::Code;

/// Writes `root/<class>/<i>.png` images of different sizes, colour and one grey, and returns
/// the per-channel mean of x/255 over all of them (grey counts towards every channel).
fn write_rgb_folder(root: &Path) -> [f64; 3] {
    let mut sums = [0f64; 3];
    let mut n = 0f64;
    let sizes = [(8u32, 8u32), (10, 12), (16, 9)];
    for (ci, class) in ["cat", "dog", "eel"].iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, &(w, h)) in sizes.iter().enumerate() {
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([
                    (x * 20 + ci as u32 * 30) as u8,
                    (y * 15) as u8,
                    ((x + y) * 7 + i as u32) as u8,
                ])
            });
            for p in img.pixels() {
                for (s, v) in sums.iter_mut().zip(p.0) {
                    *s += v as f64 / 255.0;
                }
            }
            n += (w * h) as f64;
            img.save(dir.join(format!("{i}.png"))).unwrap();
        }
    }
    let grey = image::GrayImage::from_fn(5, 7, |x, y| image::Luma([(x * 40 + y) as u8]));
    for p in grey.pixels() {
        for s in sums.iter_mut() {
            *s += p.0[0] as f64 / 255.0;
        }
    }
    n += 35.0;
    grey.save(root.join("dog").join("grey.png")).unwrap();
    sums.map(|s| s / n)
}

/// A raw `UploadDataset` stream of `entries` (name, bytes) packed as the client packs them.
fn upload_msgs(
    scratch: &Path,
    format: DatasetFormat,
    entries: &[(&str, Vec<u8>)],
    dirs: &[&str],
) -> Vec<pb::UploadDatasetRequest> {
    use pb::upload_dataset_request::Msg;
    let mut files = Vec::new();
    for (i, (name, bytes)) in entries.iter().enumerate() {
        let p = scratch.join(format!("f{i}"));
        std::fs::write(&p, bytes).unwrap();
        files.push((name.to_string(), p));
    }
    let packed = pack::pack(
        format,
        files,
        dirs.iter().map(|d| d.to_string()).collect(),
        1 << 20,
    )
    .unwrap();
    let mut out = vec![Msg::Header(pb::DatasetUploadHeader {
        name: "hostile".into(),
        format: format.as_str().into(),
        total_bytes: packed.total_bytes,
        options: None,
    })];
    for s in &packed.shards {
        out.push(Msg::Shard(pb::DatasetShard {
            sha256: s.sha256.clone(),
            size_bytes: s.size,
        }));
        for f in &s.files {
            out.push(Msg::Chunk(std::fs::read(f).unwrap()));
        }
    }
    out.push(Msg::ManifestChunk(packed.manifest.canonical_json()));
    out.into_iter()
        .map(|m| pb::UploadDatasetRequest { msg: Some(m) })
        .collect()
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut b = Vec::new();
    image::RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3]))
        .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
        .unwrap();
    b
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A tiny PNG whose (valid, checksummed) header claims `w x h` pixels.
fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    let mut b = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    b.extend_from_slice(&13u32.to_be_bytes());
    b.extend_from_slice(&ihdr);
    b.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(b"IEND");
    b.extend_from_slice(&crc32(b"IEND").to_be_bytes());
    b
}

async fn count_datasets(h: &Harness, token: &str) -> usize {
    h.developer()
        .list_datasets(authed(pb::ListDatasetsRequest::default(), token))
        .await
        .unwrap()
        .into_inner()
        .datasets
        .len()
}

async fn upload_and_rules(db: Db) {
    let outside = tempfile::tempdir().unwrap();
    let root = outside.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let root2 = root.clone();
    let Some(h) = Harness::start(
        db,
        move |c| {
            c.max_dataset_bytes = 1 << 20;
            c.dataset_root = Some(root2);
        },
        None,
    )
    .await
    else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let rgb = root.join("rgb");
    let want_mean = write_rgb_folder(&rgb);

    // Upload through the real CLI.
    let out = stdout_ok(
        &cli(
            &h,
            &dev,
            &[
                "upload-dataset",
                rgb.to_str().unwrap(),
                "--name",
                "pets",
                "--hflip",
            ],
        )
        .await,
    );
    assert!(out.starts_with("created dataset"), "{out}");
    let id = dataset_id(&out);
    let d = h
        .developer()
        .get_dataset(authed(
            pb::GetDatasetRequest {
                dataset_id: id.clone(),
            },
            &dev,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.format, "imagefolder");
    assert_eq!(d.num_samples, 10);
    assert_eq!(d.uri, format!("blob://{}", d.digest));
    let summary: adaptivenet_core::data::DatasetSummary =
        serde_json::from_str(&d.summary_json).unwrap();
    assert_eq!(summary.classes, vec!["cat", "dog", "eel"]);
    assert_eq!(summary.counts, vec![3, 4, 3]);
    assert_eq!(summary.channels, 3);
    assert_eq!(summary.min_size, (7, 5));
    assert_eq!(summary.max_size, (12, 16));
    let spec: adaptivenet_core::data::InputSpec = serde_json::from_str(&d.input_spec_json).unwrap();
    assert_eq!(spec.channels, 3);
    // Three sizes with three images each: the tie goes to the largest, 9x16.
    assert_eq!((spec.height, spec.width), (9, 16));
    for c in 0..3 {
        assert!(
            (spec.mean[c] as f64 - want_mean[c]).abs() < 1e-5,
            "mean {:?} vs {want_mean:?}",
            spec.mean
        );
    }
    let aug: adaptivenet_core::data::AugmentPolicy = serde_json::from_str(&d.augment_json).unwrap();
    assert!(aug.hflip);
    assert_eq!(aug.crop_padding, 0);
    let (blobs_after_first, tmp) = blob_files(&h);
    assert_eq!(tmp, 0);
    assert!(blobs_after_first >= 2, "a shard and a manifest");

    // Same content again, under another name: the same dataset, nothing new stored.
    let out = stdout_ok(
        &cli(
            &h,
            &dev,
            &["upload-dataset", rgb.to_str().unwrap(), "--name", "again"],
        )
        .await,
    );
    assert!(out.starts_with("existing dataset"), "{out}");
    assert_eq!(dataset_id(&out), id);
    assert_eq!(blob_files(&h), (blobs_after_first, 0));
    // get-dataset and list show it.
    let out = stdout_ok(&cli(&h, &dev, &["get-dataset", &id]).await);
    assert!(
        out.contains(&d.digest) && out.contains("\"hflip\":true"),
        "{out}"
    );
    let out = stdout_ok(&cli(&h, &dev, &["list", "datasets"]).await);
    assert!(out.contains(&id), "{out}");

    // The worker's view: materialised from the blob store, every file as uploaded.
    let dom = h
        .app()
        .store()
        .get_dataset(id.parse().unwrap())
        .await
        .unwrap();
    let local = datasets::materialise(h.app().blobs(), &dom).await.unwrap();
    assert!(local.ends_with(&d.digest));
    assert_eq!(
        std::fs::read(local.join("dog/grey.png")).unwrap(),
        std::fs::read(rgb.join("dog/grey.png")).unwrap()
    );
    let again = datasets::materialise(h.app().blobs(), &dom).await.unwrap();
    assert_eq!(again, local);
    let ds = adaptivenet_core::data::read_image_folder(
        &local,
        &adaptivenet_core::data::ImageFolderOptions {
            size: Some((9, 16)),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(ds.len(), 10);

    // Hostile uploads: INVALID_ARGUMENT naming the entry, nothing stored.
    let scratch = tempfile::tempdir().unwrap();
    let ok = png(4, 4);
    let ifo = DatasetFormat::ImageFolder;
    type Case<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>, Vec<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "traversal",
            vec![("a/x.png", ok.clone()), ("../b/y.png", ok.clone())],
            vec![],
            "../b/y.png",
        ),
        (
            "absolute",
            vec![("a/x.png", ok.clone()), ("/etc/b/y.png", ok.clone())],
            vec![],
            "/etc/b/y.png",
        ),
        (
            "backslash",
            vec![("a/x.png", ok.clone()), ("b\\y.png", ok.clone())],
            vec![],
            "b\\\\y.png",
        ),
        (
            "bomb",
            vec![
                ("a/x.png", ok.clone()),
                ("b/bomb.png", png_bomb(100_000, 100_000)),
            ],
            vec![],
            "b/bomb.png",
        ),
        (
            "non-image",
            vec![("a/x.png", ok.clone()), ("b/readme.txt", b"hello".to_vec())],
            vec![],
            "b/readme.txt",
        ),
        (
            "undecodable",
            vec![
                ("a/x.png", ok.clone()),
                ("b/broken.png", ok[..ok.len() / 2].to_vec()),
            ],
            vec![],
            "b/broken.png",
        ),
        (
            "text named png",
            vec![
                ("a/x.png", ok.clone()),
                ("b/fake.png", b"not an image".to_vec()),
            ],
            vec![],
            "b/fake.png",
        ),
        (
            "empty class",
            vec![("a/x.png", ok.clone()), ("b/y.png", ok.clone())],
            vec!["a", "b", "c"],
            "class \"c\"",
        ),
        (
            "over the size limit",
            vec![("a/x.png", ok.clone()), ("b/y.png", vec![7u8; 1 << 20])],
            vec![],
            "header.total_bytes",
        ),
    ];
    let before = count_datasets(&h, &dev).await;
    for (what, entries, dirs, needle) in cases {
        let msgs = upload_msgs(scratch.path(), ifo, &entries, &dirs);
        let err = h
            .developer()
            .upload_dataset(authed(futures::stream::iter(msgs), &dev))
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{what}: {:?} does not name {needle}",
            err.message()
        );
        assert_eq!(count_datasets(&h, &dev).await, before, "{what}");
        assert_eq!(blob_files(&h), (blobs_after_first, 0), "{what}: blobs");
    }
    // A shard whose bytes do not match its declared digest.
    let mut msgs = upload_msgs(
        scratch.path(),
        ifo,
        &[("a/x.png", ok.clone()), ("b/y.png", ok.clone())],
        &[],
    );
    if let Some(pb::upload_dataset_request::Msg::Chunk(c)) = &mut msgs[2].msg {
        c[0] ^= 1;
    }
    let err = h
        .developer()
        .upload_dataset(authed(futures::stream::iter(msgs), &dev))
        .await
        .expect_err("flipped byte");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("shard 0"), "{}", err.message());
    assert_eq!(blob_files(&h), (blobs_after_first, 0));

    // Registration by URI: under the root only.
    let reg = |uri: String, format: &str| pb::RegisterDatasetRequest {
        name: format!("reg-{}", uri.len()),
        uri,
        format: format.into(),
        num_samples: 0,
        options: None,
    };
    let r = h
        .developer()
        .register_dataset(authed(
            reg(format!("file://{}", rgb.display()), "imagefolder"),
            &dev,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.uri.starts_with("file://"));
    assert_eq!(r.num_samples, 10);
    assert_ne!(
        r.digest, d.digest,
        "registered and uploaded manifests differ"
    );
    let secret = outside.path().join("secret");
    write_rgb_folder(&secret);
    std::os::unix::fs::symlink(&secret, root.join("link")).unwrap();
    let leak = root.join("leaky");
    write_rgb_folder(&leak);
    std::os::unix::fs::symlink(secret.join("cat/0.png"), leak.join("cat/stolen.png")).unwrap();
    for (uri, needle) in [
        (format!("file://{}/../secret", root.display()), "'..'"),
        (
            format!("file://{}", secret.display()),
            "outside the dataset root",
        ),
        (
            format!("{}", root.join("link").display()),
            "outside the dataset root",
        ),
        (format!("file://{}", leak.display()), "cat/stolen.png"),
        ("http://example.com/x".to_string(), "file://"),
    ] {
        let err = h
            .developer()
            .register_dataset(authed(reg(uri.clone(), "imagefolder"), &dev))
            .await
            .expect_err(&uri);
        assert_eq!(err.code(), Code::InvalidArgument, "{uri}: {err:?}");
        assert!(err.message().contains(needle), "{uri}: {}", err.message());
    }

    // Delete: refused while a job uses the dataset, allowed once it is cancelled. The oracle
    // fits the dataset (3 channels, 3 classes; two blocks for a merge), or the job would not
    // be queued.
    let arch = br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[2],"widths":[8],"in_channels":3,"num_classes":3}"#;
    let oracle = upload_arch(&h, &dev, "o", arch, &fixture_weights(arch, 1))
        .await
        .unwrap();
    let job = h
        .developer()
        .start_elastification(authed(
            pb::StartElastificationRequest {
                oracle_id: oracle.id.clone(),
                dataset_id: id.clone(),
                supernet_name: String::new(),
                params_json: r#"{"val_size":2,"branches":["merge2"]}"#.into(),
            },
            &dev,
        ))
        .await
        .unwrap()
        .into_inner();
    let o = cli(&h, &dev, &["delete-dataset", &id]).await;
    assert!(!o.status.success());
    let err = h
        .developer()
        .delete_dataset(authed(
            pb::DeleteDatasetRequest {
                dataset_id: id.clone(),
            },
            &dev,
        ))
        .await
        .expect_err("in use");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    h.developer()
        .cancel_job(authed(pb::CancelJobRequest { job_id: job.id }, &dev))
        .await
        .unwrap();
    stdout_ok(&cli(&h, &dev, &["delete-dataset", &id]).await);
    let err = h
        .developer()
        .get_dataset(authed(pb::GetDatasetRequest { dataset_id: id }, &dev))
        .await
        .expect_err("deleted");
    assert_eq!(err.code(), Code::NotFound);
    // Its shards and manifest are gone (only the oracle's blob remains).
    assert_eq!(blob_files(&h), (1, 0));
    h.finish().await;
}
both_backends!(upload_and_rules_db, upload_and_rules);

/// Without a dataset root, registration by URI is refused outright.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_needs_a_root() {
    let Some(h) = Harness::start(Db::Sqlite, |_| {}, None).await else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let d = tempfile::tempdir().unwrap();
    write_rgb_folder(d.path());
    let err = h
        .developer()
        .register_dataset(authed(
            pb::RegisterDatasetRequest {
                name: "x".into(),
                uri: format!("file://{}", d.path().display()),
                format: "imagefolder".into(),
                num_samples: 0,
                options: None,
            },
            &dev,
        ))
        .await
        .expect_err("no root");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("--dataset-root"),
        "{}",
        err.message()
    );
    h.finish().await;
}

/// Real Fashion-MNIST IDX through the CLI: time and the computed statistics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fashion_mnist_idx_upload() {
    let dir = std::env::var("ADAPTIVENET_ASSETS")
        .map(|a| PathBuf::from(a).join("fashion-mnist"))
        .ok()
        .filter(|d| d.join("train-images-idx3-ubyte.gz").exists());
    let Some(dir) = dir else {
        if std::env::var("ADAPTIVENET_REQUIRE_ASSETS").as_deref() == Ok("1") {
            panic!("ADAPTIVENET_REQUIRE_ASSETS=1 but $ADAPTIVENET_ASSETS/fashion-mnist is absent");
        }
        eprintln!(
            "skipping: $ADAPTIVENET_ASSETS/fashion-mnist not present (scripts/fetch-assets.sh)"
        );
        return;
    };
    let Some(h) = Harness::start(Db::Sqlite, |_| {}, None).await else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let t = Instant::now();
    let out = stdout_ok(
        &cli(
            &h,
            &dev,
            &["upload-dataset", dir.to_str().unwrap(), "--name", "fmnist"],
        )
        .await,
    );
    let secs = t.elapsed().as_secs_f64();
    let d = h
        .developer()
        .get_dataset(authed(
            pb::GetDatasetRequest {
                dataset_id: dataset_id(&out),
            },
            &dev,
        ))
        .await
        .unwrap()
        .into_inner();
    let spec: adaptivenet_core::data::InputSpec = serde_json::from_str(&d.input_spec_json).unwrap();
    println!(
        "fashion-mnist upload: {secs:.1} s, {} samples, mean {:?}, std {:?}",
        d.num_samples, spec.mean, spec.std
    );
    assert_eq!(d.format, "idx");
    assert_eq!(d.num_samples, 60_000);
    assert_eq!((spec.channels, spec.height, spec.width), (1, 28, 28));
    // The published statistics of the training split.
    assert!((spec.mean[0] - 0.2860).abs() < 1e-3, "{:?}", spec.mean);
    assert!((spec.std[0] - 0.3530).abs() < 1e-3, "{:?}", spec.std);
    h.finish().await;
}

/// The CLI's preprocessing options are recorded as given; out-of-range ones are refused
/// before anything is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_options_recorded() {
    let Some(h) = Harness::start(Db::Sqlite, |_| {}, None).await else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let d = tempfile::tempdir().unwrap();
    write_rgb_folder(d.path());
    let dir = d.path().to_str().unwrap();
    let o = cli(
        &h,
        &dev,
        &[
            "upload-dataset",
            dir,
            "--name",
            "signs",
            "--crop-padding",
            "100",
        ],
    )
    .await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("crop_padding"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(blob_files(&h), (0, 0));
    let out = stdout_ok(
        &cli(
            &h,
            &dev,
            &[
                "upload-dataset",
                dir,
                "--name",
                "signs",
                "--crop-padding",
                "4",
                "--size",
                "32x32",
                "--mean",
                "0.5,0.5,0.5",
                "--std",
                "0.25,0.25,0.25",
            ],
        )
        .await,
    );
    let got = h
        .developer()
        .get_dataset(authed(
            pb::GetDatasetRequest {
                dataset_id: dataset_id(&out),
            },
            &dev,
        ))
        .await
        .unwrap()
        .into_inner();
    let spec: adaptivenet_core::data::InputSpec =
        serde_json::from_str(&got.input_spec_json).unwrap();
    assert_eq!((spec.channels, spec.height, spec.width), (3, 32, 32));
    assert_eq!(spec.mean, vec![0.5; 3]);
    assert_eq!(spec.std, vec![0.25; 3]);
    let aug: adaptivenet_core::data::AugmentPolicy =
        serde_json::from_str(&got.augment_json).unwrap();
    assert_eq!((aug.crop_padding, aug.hflip), (4, false));
    h.finish().await;
}

/// An uploaded RGB ImageFolder (not Fashion-MNIST) elastified by a real job: the supernet's
/// manifest carries the dataset's own mean/std, shape and class names.
async fn uploaded_rgb_folder_elastified(db: Db) {
    use adaptivenet_cloud::elastify::runner::ElastifyRunner;
    use adaptivenet_cloud::jobs::Worker;
    let Some(h) = Harness::start(db, |_| {}, None).await else {
        return;
    };
    let dev = h.token(Role::Developer).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rgb");
    write_small_rgb_folder(&dir);
    let out = stdout_ok(
        &cli(
            &h,
            &dev,
            &["upload-dataset", dir.to_str().unwrap(), "--name", "rgb3"],
        )
        .await,
    );
    let id = dataset_id(&out);
    let d = h
        .developer()
        .get_dataset(authed(
            pb::GetDatasetRequest {
                dataset_id: id.clone(),
            },
            &dev,
        ))
        .await
        .unwrap()
        .into_inner();
    let spec: adaptivenet_core::data::InputSpec = serde_json::from_str(&d.input_spec_json).unwrap();
    assert_eq!((spec.channels, spec.height, spec.width), (3, 16, 16));

    let arch = br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[2],"widths":[8],"in_channels":3,"num_classes":3}"#;
    let oracle = upload_arch(&h, &dev, "rgb-oracle", arch, &fixture_weights(arch, 7))
        .await
        .unwrap();
    let job = h
        .developer()
        .start_elastification(authed(
            pb::StartElastificationRequest {
                oracle_id: oracle.id.clone(),
                dataset_id: id.clone(),
                supernet_name: String::new(),
                params_json: r#"{"branches":["merge2"],"stage0_steps":2,"stage1_steps":2,"batch":8,"val_size":12,"priors":4,"checkpoint_every":0}"#.into(),
            },
            &dev,
        ))
        .await
        .unwrap()
        .into_inner();
    let worker = Worker::new(h.app().clone(), std::sync::Arc::new(ElastifyRunner), "w");
    let stop = tokio_util::sync::CancellationToken::new();
    assert!(worker.poll_once(&stop).await.expect("poll"), "job claimed");
    let done = h
        .developer()
        .get_job(authed(pb::GetJobRequest { job_id: job.id }, &dev))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, pb::JobState::Succeeded as i32, "{done:?}");
    let s = h
        .developer()
        .get_supernet(authed(
            pb::GetSupernetRequest {
                supernet_id: done.supernet_id.clone(),
            },
            &dev,
        ))
        .await
        .unwrap()
        .into_inner();
    let m = adaptivenet_core::artifact::Manifest::from_json(&s.manifest_json).unwrap();
    assert_eq!(m.input.shape, [3, 16, 16]);
    assert_eq!(
        m.input.mean, spec.mean,
        "the dataset's mean, not a constant"
    );
    assert_eq!(m.input.std, spec.std);
    assert_eq!(m.input.mean.len(), 3);
    assert_eq!(m.input.class_names, ["left", "right", "tint"]);
    assert!(!m.priors.is_empty());
    // Module blobs went straight into the store: each one is there, and no scratch artifact
    // directory was left in the store's temp area (only the process's own scratch, `p-*`).
    for sha in distinct_blobs(&m) {
        assert!(h.app().blobs().exists(&sha).await, "module blob {sha}");
    }
    let tmp_dirs: Vec<_> = std::fs::read_dir(h.app().blobs().root().join("tmp"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with("p-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(tmp_dirs.is_empty(), "{tmp_dirs:?}");
    h.finish().await;
}
both_backends!(
    uploaded_rgb_folder_elastified_db,
    uploaded_rgb_folder_elastified
);
