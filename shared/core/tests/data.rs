//! Data readers, splits and transforms: synthetic files written here, plus an asset-tier check
//! on the real Fashion-MNIST (skipped unless present; required under
//! `ADAPTIVENET_REQUIRE_ASSETS=1`).
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use adaptivenet_core::data::{
    class_filter, dirichlet_partition, fashion_mnist, holdout, imagenet_preprocess_lite,
    imagenet_preprocess_lite_chw, parse_idx_images, parse_idx_labels, pixels::resize_bilinear_u8,
    read_idx_images, read_idx_labels, read_image_folder, split_indices, ColorMode, Dataset,
    Holdout, ImageFolderOptions, Normalize, Split, Transform,
};
use adaptivenet_core::{assets, CoreError};
use candle_core::{DType, Device};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------- IDX helpers

fn idx_images_bytes(count: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2051u32, count, rows, cols] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(pixels);
    b
}

fn idx_labels_bytes(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2049u32, labels.len() as u32] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(labels);
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Asserts a `Dataset` error whose path ends with `file` and whose reason mentions `needle`.
fn assert_dataset_err<T: std::fmt::Debug>(
    r: adaptivenet_core::Result<T>,
    file: &str,
    needle: &str,
) {
    match r {
        Err(CoreError::Dataset { path, reason }) => {
            assert!(path.ends_with(file), "path {path:?} should name {file}");
            assert!(
                reason.contains(needle),
                "reason {reason:?} should mention {needle:?}"
            );
        }
        other => panic!("expected a Dataset error for {file}, got {other:?}"),
    }
}

/// 5 images of 3x4 with distinct pixels, labels 0..=2.
fn sample_idx() -> (Vec<u8>, Vec<u8>) {
    let pixels: Vec<u8> = (0..5 * 3 * 4).map(|i| (i * 7 % 256) as u8).collect();
    (pixels, vec![0, 1, 2, 1, 0])
}

// ---------------------------------------------------------------- IDX

#[test]
fn idx_round_trip_raw_and_gzipped() {
    let dir = tempfile::tempdir().unwrap();
    let (pixels, labels) = sample_idx();
    let img = idx_images_bytes(5, 3, 4, &pixels);
    let lab = idx_labels_bytes(&labels);
    for (suffix, f) in [
        ("", (|b: &[u8]| b.to_vec()) as fn(&[u8]) -> Vec<u8>),
        (".gz", gzip),
    ] {
        // The name does not matter: compression is detected from the bytes.
        let ip = write(dir.path(), &format!("img{suffix}"), &f(&img));
        let lp = write(dir.path(), &format!("lab{suffix}"), &f(&lab));
        let ds = adaptivenet_core::data::read_idx_pair(&ip, &lp, &["a", "b", "c"]).unwrap();
        assert_eq!(ds.len(), 5);
        assert_eq!((ds.channels, ds.height, ds.width), (1, 3, 4));
        assert_eq!(ds.images, pixels);
        assert_eq!(ds.labels, vec![0, 1, 2, 1, 0]);
        assert_eq!(ds.class_names, vec!["a", "b", "c"]);
        assert_eq!(ds.num_classes(), 3);
        assert_eq!(ds.class_counts(), vec![2, 2, 1]);
        assert_eq!(ds.image(1), &pixels[12..24]);
        ds.validate().unwrap();
        let imgs = read_idx_images(&ip).unwrap();
        assert_eq!((imgs.count, imgs.rows, imgs.cols), (5, 3, 4));
        assert_eq!(read_idx_labels(&lp).unwrap(), labels);
    }
    // Without class names, classes are named after the labels seen.
    let ip = write(dir.path(), "i", &img);
    let lp = write(dir.path(), "l", &lab);
    let ds = adaptivenet_core::data::read_idx_pair(&ip, &lp, &[]).unwrap();
    assert_eq!(ds.class_names, vec!["0", "1", "2"]);
}

#[test]
fn idx_malformed_files_name_the_path_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (pixels, labels) = sample_idx();
    let img = idx_images_bytes(5, 3, 4, &pixels);
    let lab = idx_labels_bytes(&labels);
    let good_img = write(d, "good-img", &img);
    let good_lab = write(d, "good-lab", &lab);

    // A label file where images are expected (and vice versa), and a foreign magic.
    assert_dataset_err(read_idx_images(&good_lab), "good-lab", "magic");
    assert_dataset_err(read_idx_labels(&good_img), "good-img", "magic");
    let mut bad = img.clone();
    bad[0] = 0x12;
    assert_dataset_err(
        read_idx_images(write(d, "bad-magic", &bad)),
        "bad-magic",
        "magic",
    );
    let mut f32_type = img.clone();
    f32_type[2] = 0x0d;
    assert_dataset_err(
        read_idx_images(write(d, "f32", &f32_type)),
        "f32",
        "only u8",
    );
    // Truncated header, truncated data, trailing garbage.
    assert_dataset_err(
        read_idx_images(write(d, "short-hdr", &img[..10])),
        "short-hdr",
        "header",
    );
    assert_dataset_err(read_idx_images(write(d, "empty", &[])), "empty", "magic");
    let cut = &img[..img.len() - 1];
    assert_dataset_err(read_idx_images(write(d, "cut", cut)), "cut", "truncated");
    assert_dataset_err(
        read_idx_images(write(d, "cut.gz", &gzip(cut))),
        "cut.gz",
        "truncated",
    );
    let mut long = img.clone();
    long.push(0);
    assert_dataset_err(read_idx_images(write(d, "long", &long)), "long", "trailing");
    let cut_lab = &lab[..lab.len() - 2];
    assert_dataset_err(
        read_idx_labels(write(d, "cut-lab", cut_lab)),
        "cut-lab",
        "truncated",
    );
    // A broken gzip stream.
    let gz = gzip(&img);
    let broken_gz = &gz[..gz.len() / 2];
    assert_dataset_err(
        read_idx_images(write(d, "broken.gz", broken_gz)),
        "broken.gz",
        "gzip",
    );
    // Absurd declared sizes: must fail on the length check, not try to allocate.
    let absurd = idx_images_bytes(u32::MAX, u32::MAX, u32::MAX, &[1, 2, 3]);
    assert_dataset_err(read_idx_images(write(d, "absurd", &absurd)), "absurd", "");
    let absurd = idx_images_bytes(u32::MAX, 28, 28, &[0; 100]);
    assert_dataset_err(
        read_idx_images(write(d, "absurd2", &absurd)),
        "absurd2",
        "truncated",
    );
    assert_dataset_err(
        read_idx_images(write(d, "absurd2.gz", &gzip(&absurd))),
        "absurd2.gz",
        "truncated",
    );
    let mut absurd_lab = lab[..8].to_vec();
    absurd_lab[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_dataset_err(
        read_idx_labels(write(d, "absurd-lab", &absurd_lab)),
        "absurd-lab",
        "truncated",
    );
    // Zero-sized images.
    let zero = idx_images_bytes(0, 0, 28, &[]);
    assert_dataset_err(
        read_idx_images(write(d, "zero", &zero)),
        "zero",
        "zero size",
    );
    // Count mismatch between the pair, and labels beyond the class names.
    let four = write(d, "four-lab", &idx_labels_bytes(&labels[..4]));
    assert_dataset_err(
        adaptivenet_core::data::read_idx_pair(&good_img, &four, &["a", "b", "c"]),
        "four-lab",
        "count mismatch",
    );
    assert_dataset_err(
        adaptivenet_core::data::read_idx_pair(&good_img, &good_lab, &["a", "b"]),
        "good-lab",
        "out of range",
    );
    // A missing file is an I/O error naming it.
    match read_idx_images(d.join("nope")) {
        Err(CoreError::Io { path, .. }) => assert!(path.ends_with("nope")),
        other => panic!("expected Io, got {other:?}"),
    }
    // The in-memory parsers report `<memory>`.
    assert_dataset_err(parse_idx_images(&lab), "<memory>", "magic");
}

/// Random byte flips, truncations and extensions of valid raw and gzipped files never panic,
/// and whatever parses is self-consistent.
#[test]
fn idx_parser_survives_random_corruption() {
    let (pixels, labels) = sample_idx();
    let img = idx_images_bytes(5, 3, 4, &pixels);
    let lab = idx_labels_bytes(&labels);
    let seeds = [img.clone(), gzip(&img), lab.clone(), gzip(&lab)];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (mut ok, mut err) = (0, 0);
    for round in 0..4000 {
        let mut b = seeds[round % seeds.len()].clone();
        match rng.random_range(0..4) {
            0 => {
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..b.len());
                    b[i] ^= 1 << rng.random_range(0..8);
                }
            }
            1 => b.truncate(rng.random_range(0..b.len())),
            2 => {
                // Corrupt the header's dimensions specifically.
                let i = rng.random_range(0..b.len().min(16));
                b[i] = rng.random();
            }
            _ => b.extend((0..rng.random_range(1..8)).map(|_| rng.random::<u8>())),
        }
        match parse_idx_images(&b) {
            Ok(imgs) => {
                ok += 1;
                assert_eq!(imgs.pixels.len(), imgs.count * imgs.rows * imgs.cols);
            }
            Err(CoreError::Dataset { .. }) => err += 1,
            Err(e) => panic!("unexpected error kind {e:?}"),
        }
        if let Ok(l) = parse_idx_labels(&b) {
            assert!(l.len() <= b.len() * 1032);
        }
    }
    assert!(
        err > 1000,
        "corruptions should mostly fail ({ok} ok, {err} err)"
    );
}

// ---------------------------------------------------------------- splits

fn labels_10x(n_per: usize) -> Vec<u32> {
    (0..10 * n_per).map(|i| (i % 10) as u32).collect()
}

#[test]
fn splits_are_deterministic_and_exhaustive() {
    let s = Split::Fractions(vec![0.8, 0.1, 0.1]);
    let a = split_indices(1003, &s, 42).unwrap();
    assert_eq!(a, split_indices(1003, &s, 42).unwrap());
    assert_ne!(a, split_indices(1003, &s, 43).unwrap());
    assert_eq!(
        a.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![803, 100, 100]
    );
    let mut all: Vec<usize> = a.concat();
    all.sort_unstable();
    assert_eq!(all, (0..1003).collect::<Vec<_>>());
    assert!(
        a.iter().all(|p| p.windows(2).all(|w| w[0] < w[1])),
        "parts are sorted"
    );

    let c = Split::Counts(vec![10, 20]).indices(100, 1).unwrap();
    assert_eq!((c[0].len(), c[1].len()), (10, 20));
    assert!(Split::Counts(vec![60, 41]).indices(100, 1).is_err());
    assert!(Split::Fractions(vec![0.7, 0.7]).indices(100, 1).is_err());
    assert!(Split::Fractions(vec![-0.1]).indices(100, 1).is_err());
    assert!(Split::Fractions(vec![f64::NAN]).indices(100, 1).is_err());
}

#[test]
fn stratified_split_keeps_class_proportions() {
    // Unbalanced classes: class c has 50 + 10c items.
    let mut labels = Vec::new();
    for c in 0..5u32 {
        labels.extend(std::iter::repeat_n(c, 50 + 10 * c as usize));
    }
    let n = labels.len(); // 350
    let parts = Split::Fractions(vec![0.7, 0.2, 0.1])
        .stratified(&labels, 3)
        .unwrap();
    assert_eq!(
        parts.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![245, 70, 35]
    );
    let mut all = parts.concat();
    all.sort_unstable();
    assert_eq!(all, (0..n).collect::<Vec<_>>());
    for (p, frac) in parts.iter().zip([0.7, 0.2, 0.1]) {
        for c in 0..5u32 {
            let got = p.iter().filter(|&&i| labels[i] == c).count() as f64;
            let want = frac * (50 + 10 * c) as f64;
            assert!((got - want).abs() <= 1.0, "class {c}: {got} vs {want}");
        }
    }
    assert_eq!(
        parts,
        Split::Fractions(vec![0.7, 0.2, 0.1])
            .stratified(&labels, 3)
            .unwrap()
    );
}

#[test]
fn holdout_per_class_and_total() {
    let labels = labels_10x(600);
    let (rest, held) = holdout(&labels, Holdout::PerClass(100), 9).unwrap();
    assert_eq!((rest.len(), held.len()), (5000, 1000));
    for c in 0..10u32 {
        assert_eq!(held.iter().filter(|&&i| labels[i] == c).count(), 100);
    }
    let rest_set: HashSet<_> = rest.iter().collect();
    assert!(held.iter().all(|i| !rest_set.contains(i)));
    assert_eq!(
        (rest.clone(), held.clone()),
        holdout(&labels, Holdout::PerClass(100), 9).unwrap()
    );
    assert_ne!(
        held,
        holdout(&labels, Holdout::PerClass(100), 10).unwrap().1
    );

    let (rest, held) = holdout(&labels, Holdout::Total(1000), 9).unwrap();
    assert_eq!((rest.len(), held.len()), (5000, 1000));
    for c in 0..10u32 {
        assert_eq!(held.iter().filter(|&&i| labels[i] == c).count(), 100);
    }
    assert!(holdout(&labels, Holdout::PerClass(601), 9).is_err());
    assert!(holdout(&labels, Holdout::Total(6001), 9).is_err());
}

#[test]
fn dirichlet_partition_covers_every_index_once() {
    let labels = labels_10x(500);
    for alpha in [0.01, 0.1, 0.5, 1.0, 100.0] {
        let parts = dirichlet_partition(&labels, 7, alpha, 5).unwrap();
        assert_eq!(parts.len(), 7);
        let mut all = parts.concat();
        all.sort_unstable();
        assert_eq!(all, (0..labels.len()).collect::<Vec<_>>(), "alpha {alpha}");
        assert_eq!(parts, dirichlet_partition(&labels, 7, alpha, 5).unwrap());
        assert_ne!(parts, dirichlet_partition(&labels, 7, alpha, 6).unwrap());
    }
    // Small alpha concentrates each class on few devices; large alpha spreads it evenly.
    let max_share = |alpha: f64| {
        let parts = dirichlet_partition(&labels, 5, alpha, 1).unwrap();
        let mut worst: f64 = 0.0;
        for c in 0..10u32 {
            for p in &parts {
                let k = p.iter().filter(|&&i| labels[i] == c).count();
                worst = worst.max(k as f64 / 500.0);
            }
        }
        worst
    };
    assert!(max_share(0.05) > 0.8, "alpha 0.05: {}", max_share(0.05));
    assert!(max_share(1000.0) < 0.3, "alpha 1000: {}", max_share(1000.0));
    assert!(dirichlet_partition(&labels, 0, 1.0, 1).is_err());
    assert!(dirichlet_partition(&labels, 3, 0.0, 1).is_err());
    assert!(dirichlet_partition(&labels, 3, f64::NAN, 1).is_err());
}

#[test]
fn class_filter_selects_footwear() {
    let labels = labels_10x(3);
    let idx = class_filter(&labels, &[5, 7, 9]);
    assert_eq!(idx.len(), 9);
    assert!(idx.iter().all(|&i| [5, 7, 9].contains(&labels[i])));
    assert!(class_filter(&labels, &[]).is_empty());
}

// ---------------------------------------------------------------- transforms

/// One 1x3x3 image with pixels 1..=9, label 0.
fn tiny() -> Dataset {
    Dataset::new((1..=9).collect(), vec![0], (1, 3, 3), vec!["x".into()]).unwrap()
}

fn batch_values(ds: &Dataset, t: &Transform, idx: &[usize]) -> Vec<f32> {
    let (x, _) = ds.batch_tensor(idx, t, &Device::Cpu).unwrap();
    x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn normalisation_values() {
    let ds = Dataset::new(vec![0, 127, 255, 51], vec![0], (1, 2, 2), vec!["x".into()]).unwrap();
    let raw = batch_values(&ds, &Transform::new().normalize(Normalize::Raw), &[0]);
    assert_eq!(raw, vec![0.0, 127.0, 255.0, 51.0]);
    let unit = batch_values(&ds, &Transform::new(), &[0]);
    assert_eq!(unit, vec![0.0, 127.0 / 255.0, 1.0, 0.2]);
    let lite = batch_values(&ds, &Transform::new().normalize(Normalize::Lite), &[0]);
    assert_eq!(lite, vec![-127.0 / 128.0, 0.0, 1.0, -76.0 / 128.0]);
    let ms = Normalize::MeanStd {
        mean: vec![0.5],
        std: vec![0.25],
    };
    let v = batch_values(&ds, &Transform::new().normalize(ms), &[0]);
    for (got, px) in v.iter().zip([0.0f32, 127.0, 255.0, 51.0]) {
        assert!((got - (px / 255.0 - 0.5) / 0.25).abs() < 1e-6);
    }
    // Grey -> RGB replicates and normalises per output channel.
    let t = Transform::new()
        .grey_to_rgb()
        .normalize(Normalize::imagenet());
    let (x, y) = ds.batch_tensor(&[0, 0], &t, &Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[2, 3, 2, 2]);
    assert_eq!((x.dtype(), y.dtype()), (DType::F32, DType::U32));
    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
    for c in 0..3 {
        assert!((v[c * 4 + 2] - (1.0 - mean[c]) / std[c]).abs() < 1e-5);
    }
    // Mismatched statistics or a zero std are configuration errors.
    let bad = Normalize::MeanStd {
        mean: vec![0.5, 0.5],
        std: vec![0.2, 0.2],
    };
    assert!(ds
        .batch_tensor(&[0], &Transform::new().normalize(bad), &Device::Cpu)
        .is_err());
    let zero = Normalize::MeanStd {
        mean: vec![0.5],
        std: vec![0.0],
    };
    assert!(ds
        .batch_tensor(&[0], &Transform::new().normalize(zero), &Device::Cpu)
        .is_err());
}

#[test]
fn batch_tensor_shapes_labels_and_bounds() {
    let pixels: Vec<u8> = (0..4 * 2 * 2).map(|i| i as u8).collect();
    let ds = Dataset::new(
        pixels,
        vec![3, 1, 0, 2],
        (1, 2, 2),
        (0..4).map(|i| i.to_string()).collect(),
    )
    .unwrap();
    let (x, y) = ds
        .batch_tensor(
            &[2, 0],
            &Transform::new().normalize(Normalize::Raw),
            &Device::Cpu,
        )
        .unwrap();
    assert_eq!(x.dims(), &[2, 1, 2, 2]);
    assert_eq!(y.to_vec1::<u32>().unwrap(), vec![0, 3]);
    assert_eq!(
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![8., 9., 10., 11., 0., 1., 2., 3.]
    );
    assert!(ds
        .batch_tensor(&[4], &Transform::new(), &Device::Cpu)
        .is_err());
    let sub = ds.subset(&[3, 1]).unwrap();
    assert_eq!(
        (sub.labels.clone(), sub.images.clone()),
        (vec![2, 1], vec![12, 13, 14, 15, 4, 5, 6, 7])
    );
    assert!(ds.subset(&[9]).is_err());
    assert!(Dataset::new(vec![0; 5], vec![0], (1, 2, 2), vec!["a".into()]).is_err());
    assert!(Dataset::new(vec![0; 4], vec![1], (1, 2, 2), vec!["a".into()]).is_err());
}

#[test]
fn center_crop_and_resize() {
    let ds = Dataset::new((0..16).collect(), vec![0], (1, 4, 4), vec!["x".into()]).unwrap();
    let raw = Transform::new().normalize(Normalize::Raw);
    assert_eq!(
        batch_values(&ds, &raw.clone().center_crop(2, 2), &[0]),
        vec![5., 6., 9., 10.]
    );
    assert_eq!(
        batch_values(&ds, &raw.clone().center_crop(1, 3), &[0]).len(),
        3
    );
    assert!(ds
        .batch_tensor(&[0], &raw.clone().center_crop(5, 1), &Device::Cpu)
        .is_err());
    // Half-pixel bilinear: [0, 200] -> [0, 50, 150, 200].
    assert_eq!(
        resize_bilinear_u8(&[0, 200], 1, 1, 2, 1, 4),
        vec![0, 50, 150, 200]
    );
    assert_eq!(
        resize_bilinear_u8(&[9, 8, 7, 6], 1, 2, 2, 2, 2),
        vec![9, 8, 7, 6]
    );
    let two = Dataset::new(vec![0, 200, 0, 200], vec![0], (1, 2, 2), vec!["x".into()]).unwrap();
    let v = batch_values(&two, &raw.clone().resize(4, 4).center_crop(2, 2), &[0]);
    assert_eq!(v, vec![50., 150., 50., 150.]);
}

/// The padded crop of `img` (3x3) at offset (dy, dx) in -1..=1, then optionally flipped.
fn shifted(img: &[u8], dy: isize, dx: isize, flip: bool) -> Vec<f32> {
    let mut out = Vec::new();
    for y in 0..3isize {
        for x in 0..3isize {
            let xf = if flip { 2 - x } else { x };
            let (sy, sx) = (y + dy, xf + dx);
            let v = if (0..3).contains(&sy) && (0..3).contains(&sx) {
                img[(sy * 3 + sx) as usize]
            } else {
                0
            };
            out.push(v as f32);
        }
    }
    out
}

#[test]
fn augmentation_is_a_padded_crop_and_flip() {
    let ds = tiny();
    let img: Vec<u8> = (1..=9).collect();
    // Hand-written anchors for the reference above.
    assert_eq!(
        shifted(&img, 0, 0, true),
        vec![3., 2., 1., 6., 5., 4., 9., 8., 7.]
    );
    assert_eq!(
        shifted(&img, -1, -1, false),
        vec![0., 0., 0., 0., 1., 2., 0., 4., 5.]
    );
    assert_eq!(
        shifted(&img, 1, 0, false),
        vec![4., 5., 6., 7., 8., 9., 0., 0., 0.]
    );
    let candidates: Vec<Vec<f32>> = (-1..=1)
        .flat_map(|dy| (-1..=1).flat_map(move |dx| [false, true].map(|f| (dy, dx, f))))
        .map(|(dy, dx, f)| shifted(&img, dy, dx, f))
        .collect();
    let t = Transform::new().normalize(Normalize::Raw).augment(1, true);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut seen = HashSet::new();
    for _ in 0..300 {
        let (x, _) = ds
            .batch_tensor_augmented(&[0], &t, &mut rng, &Device::Cpu)
            .unwrap();
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let k = candidates
            .iter()
            .position(|c| *c == v)
            .expect("output is a padded crop/flip");
        seen.insert(k);
    }
    assert_eq!(seen.len(), 18, "every offset and flip occurs");
    // The evaluation path ignores the augmentation; a seeded RNG reproduces batches.
    assert_eq!(batch_values(&ds, &t, &[0]), shifted(&img, 0, 0, false));
    let run = |seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (x, _) = ds
            .batch_tensor_augmented(&[0; 16], &t, &mut rng, &Device::Cpu)
            .unwrap();
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
    // Padding is zero *before* normalisation.
    let lite = Transform::new()
        .normalize(Normalize::Lite)
        .augment(3, false);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (x, _) = ds
        .batch_tensor_augmented(&[0; 8], &lite, &mut rng, &Device::Cpu)
        .unwrap();
    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.contains(&(-127.0 / 128.0)));
}

#[test]
fn imagenet_lite_preprocessing() {
    // 3x256x300: crop side floor(224/256*256) = 224, offsets ((256-224)+1)/2 = 16 and 38;
    // resizing 224 -> 224 is the identity, so values are exact.
    let (h, w) = (256usize, 300usize);
    let px = |c: usize, y: usize, x: usize| ((c * 50 + y * 3 + x * 7) % 256) as u8;
    let mut chw = vec![0u8; 3 * h * w];
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                chw[(c * h + y) * w + x] = px(c, y, x);
            }
        }
    }
    let t = imagenet_preprocess_lite_chw(&chw, h, w).unwrap();
    assert_eq!(t.dims(), &[1, 3, 224, 224]);
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for &(c, y, x) in &[(0, 0, 0), (1, 100, 7), (2, 223, 223)] {
        let want = (px(c, y + 16, x + 38) as f32 - 127.0) / 128.0;
        assert_eq!(v[(c * 224 + y) * 224 + x], want, "({c},{y},{x})");
    }
    assert!(imagenet_preprocess_lite_chw(&chw[1..], h, w).is_err());

    // From a file: a uniform 127 photo is all zeros after normalisation.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("grey.png");
    image::RgbImage::from_pixel(320, 240, image::Rgb([127, 127, 127]))
        .save(&p)
        .unwrap();
    let t = imagenet_preprocess_lite(&p).unwrap();
    assert_eq!(t.dims(), &[1, 3, 224, 224]);
    let max = t
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(max, 0.0);
    let bad = write(dir.path(), "bad.png", b"not a png");
    assert_dataset_err(imagenet_preprocess_lite(&bad), "bad.png", "decode");
}

// ---------------------------------------------------------------- ImageFolder

#[test]
fn image_folder_reads_sorted_classes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for class in ["b_cat", "a_dog"] {
        std::fs::create_dir(root.join(class)).unwrap();
    }
    // a_dog: two red 4x6 PNGs; b_cat: a blue 4x6 PNG, a grey 8x12 JPEG, and a README.
    let red = image::RgbImage::from_pixel(6, 4, image::Rgb([200, 0, 0]));
    red.save(root.join("a_dog/1.png")).unwrap();
    red.save(root.join("a_dog/0.PNG")).unwrap();
    image::RgbImage::from_pixel(6, 4, image::Rgb([0, 0, 100]))
        .save(root.join("b_cat/x.png"))
        .unwrap();
    image::GrayImage::from_pixel(12, 8, image::Luma([90]))
        .save(root.join("b_cat/y.jpg"))
        .unwrap();
    std::fs::write(root.join("b_cat/README.txt"), "ignored").unwrap();
    std::fs::write(root.join("stray-file.png"), "not a class").unwrap();

    let opts = ImageFolderOptions {
        color: ColorMode::Rgb,
        size: Some((4, 6)),
    };
    let ds = read_image_folder(root, &opts).unwrap();
    assert_eq!(ds.class_names, vec!["a_dog", "b_cat"]);
    assert_eq!(ds.labels, vec![0, 0, 1, 1]);
    assert_eq!((ds.channels, ds.height, ds.width), (3, 4, 6));
    ds.validate().unwrap();
    // Planar CHW: the red image's R plane is 200, G and B 0.
    assert!(ds.image(0)[..24].iter().all(|&v| v == 200));
    assert!(ds.image(0)[24..].iter().all(|&v| v == 0));
    assert!(ds.image(2)[48..].iter().all(|&v| v == 100));
    // The resized uniform JPEG stays (nearly) uniform grey in all three channels.
    assert!(
        ds.image(3).iter().all(|&v| v.abs_diff(90) <= 2),
        "{:?}",
        ds.image(3)
    );

    let grey = read_image_folder(
        root,
        &ImageFolderOptions {
            color: ColorMode::Grey,
            size: Some((2, 3)),
        },
    )
    .unwrap();
    assert_eq!(
        (grey.channels, grey.height, grey.width, grey.len()),
        (1, 2, 3, 4)
    );

    // Without a size, differing image sizes are an error naming the file.
    assert_dataset_err(
        read_image_folder(root, &ImageFolderOptions::default()),
        "y.jpg",
        "set a size",
    );
    // An undecodable image names the file.
    std::fs::write(root.join("a_dog/2.png"), b"\x89PNG garbage").unwrap();
    assert_dataset_err(read_image_folder(root, &opts), "2.png", "decode");
}

#[test]
fn image_folder_rejects_empty_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ImageFolderOptions::default();
    let root = dir.path().to_path_buf();
    let name = root.file_name().unwrap().to_string_lossy().into_owned();
    assert_dataset_err(read_image_folder(&root, &opts), &name, "no class");
    std::fs::create_dir(root.join("empty")).unwrap();
    assert_dataset_err(read_image_folder(&root, &opts), "empty", "no .png");
    assert!(matches!(
        read_image_folder(root.join("missing"), &opts),
        Err(CoreError::Io { .. })
    ));
}

// ---------------------------------------------------------------- asset tier

fn fashion_dir() -> Option<PathBuf> {
    let dir = assets::assets_dir().join("fashion-mnist");
    if assets::asset("fashion-mnist/train-images-idx3-ubyte.gz").is_some() {
        return Some(dir);
    }
    let reason = format!(
        "Fashion-MNIST not found under {} (run scripts/fetch-assets.sh)",
        dir.display()
    );
    assert!(!assets::require_assets(), "{reason}");
    println!("skipping: {reason}");
    None
}

#[test]
fn fashion_mnist_real_counts_and_pipeline() {
    let Some(dir) = fashion_dir() else { return };
    let t0 = std::time::Instant::now();
    let train = fashion_mnist(&dir, true).unwrap();
    let test = fashion_mnist(&dir, false).unwrap();
    println!("read train+test in {:.2?}", t0.elapsed());
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!((train.channels, train.height, train.width), (1, 28, 28));
    assert_eq!(train.class_counts(), vec![6_000; 10]);
    assert_eq!(test.class_counts(), vec![1_000; 10]);
    assert_eq!(train.class_names[9], "Ankle boot");

    // The normalisation constants match the data.
    let n = train.images.len() as f64;
    let mean = train.images.iter().map(|&v| v as f64 / 255.0).sum::<f64>() / n;
    let var = train
        .images
        .iter()
        .map(|&v| (v as f64 / 255.0 - mean).powi(2))
        .sum::<f64>()
        / n;
    println!("train mean {mean:.4} std {:.4}", var.sqrt());
    assert!((mean - 0.2860).abs() < 5e-4 && (var.sqrt() - 0.3530).abs() < 5e-4);

    // The search hold-out: 100 per class.
    let (rest, held) = holdout(&train.labels, Holdout::PerClass(100), 0).unwrap();
    assert_eq!((rest.len(), held.len()), (59_000, 1_000));
    let search = train.subset(&held).unwrap();
    assert_eq!(search.class_counts(), vec![100; 10]);

    // One augmented training epoch through the batch path, timed.
    let t = Transform::new()
        .normalize(Normalize::MeanStd {
            mean: vec![0.2860],
            std: vec![0.3530],
        })
        .augment(2, true);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let order = adaptivenet_core::data::shuffled_indices(train.len(), 0);
    let t0 = std::time::Instant::now();
    let mut checksum = 0f64;
    for chunk in order.chunks(256) {
        let (x, y) = train
            .batch_tensor_augmented(chunk, &t, &mut rng, &Device::Cpu)
            .unwrap();
        assert_eq!(x.dims()[1..], [1, 28, 28]);
        assert_eq!(y.dims(), &[chunk.len()]);
        checksum += x.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    }
    println!(
        "augmented epoch of 60k images in {:.2?} (checksum {checksum:.1})",
        t0.elapsed()
    );
    assert!(checksum.is_finite());
}

#[test]
fn imagenet_lite_preprocessing_of_a_real_photo() {
    let Some(p) = assets::asset("skimage/chelsea.png") else {
        let reason = "skimage/chelsea.png not in the assets (run scripts/fetch-assets.sh)";
        assert!(!assets::require_assets(), "{reason}");
        println!("skipping: {reason}");
        return;
    };
    let t = imagenet_preprocess_lite(&p).unwrap();
    assert_eq!(t.dims(), &[1, 3, 224, 224]);
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (lo, hi) = v
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert!(
        lo >= -127.0 / 128.0 && hi <= 1.0 && hi - lo > 1.0,
        "range {lo}..{hi}"
    );
}
