//! Weight-reader tests: the torchvision safetensors fixtures, tiny `.pth` files in both PyTorch
//! formats (tests/data, made by make_pth_fixtures.py without torch, values cross-checked against
//! Python's own index arithmetic), real torch-written zip files from candle's test suite, the
//! real EfficientNet-Lite0 checkpoint (asset tier), and robustness against corrupted input.
use std::path::{Path, PathBuf};

use adaptivenet_core::weights::{
    detect_format, read_tensors, read_tensors_from_bytes, read_tensors_from_bytes_with,
    ReadOptions, WeightFormat,
};
use candle_core::{DType, Tensor};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// The torchvision fixtures: `$ADAPTIVENET_FIXTURES`, else the copy committed under
/// `tests/fixtures/torchvision`.
fn fixtures_dir() -> Option<PathBuf> {
    [
        std::env::var_os("ADAPTIVENET_FIXTURES").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torchvision")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.join("index.json").is_file())
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn get<'a>(ts: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &ts.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        .1
}

// ---------------------------------------------------------------- safetensors fixtures

#[test]
fn torchvision_safetensors_fixtures_load_as_f32() {
    let Some(dir) = fixtures_dir() else {
        assert!(
            !adaptivenet_core::assets::require_assets(),
            "shared fixtures not found"
        );
        println!("skipping: shared fixtures folder not found");
        return;
    };
    // (file, tensors in file, int64 ones skipped, float params, first tensor, its shape,
    //  its first three values as stored, last classifier weight name and shape)
    #[allow(clippy::type_complexity)]
    let cases: [(
        &str,
        usize,
        usize,
        usize,
        &str,
        [usize; 4],
        [f64; 3],
        &str,
        [usize; 2],
    ); 3] = [
        (
            "tv_mobilenet_v2_w050_c10",
            314,
            52,
            719_034,
            "features.0.0.weight",
            [16, 3, 3, 3],
            [
                0.20410063862800598,
                -0.1604902744293213,
                -0.08152920752763748,
            ],
            "classifier.1.weight",
            [10, 1280],
        ),
        (
            "tv_resnet18_c10",
            122,
            20,
            11_191_242,
            "conv1.weight",
            [64, 3, 7, 7],
            [
                -0.004222869873046875,
                -0.0113983154296875,
                -0.007503509521484375,
            ],
            "fc.weight",
            [10, 512],
        ),
        (
            "tv_resnet_bottleneck1111_w16_c10",
            104,
            17,
            3_548_746,
            "conv1.weight",
            [64, 3, 7, 7],
            [-0.0226287841796875, -0.0531005859375, 0.00983428955078125],
            "fc.weight",
            [10, 2048],
        ),
    ];
    for (stem, total, ints, params, first, shape, head, fc, fc_shape) in cases {
        let path = dir.join(format!("{stem}.safetensors"));
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(detect_format(&bytes).unwrap(), WeightFormat::Safetensors);
        let ts = read_tensors(&path).unwrap();
        assert_eq!(ts.len(), total - ints, "{stem}: int64 tensors are skipped");
        assert!(ts.iter().all(|(n, _)| !n.ends_with("num_batches_tracked")));
        assert!(ts
            .iter()
            .all(|(_, t)| t.dtype() == DType::F32 && t.is_contiguous()));
        let n: usize = ts.iter().map(|(_, t)| t.elem_count()).sum();
        assert_eq!(n, params, "{stem}: float parameter count");
        let t = get(&ts, first);
        assert_eq!(t.dims(), shape);
        let v = values(t);
        for (got, want) in v.iter().zip(head) {
            assert!(
                (*got as f64 - want).abs() < 1e-7,
                "{stem} {first}: {got} vs {want}"
            );
        }
        assert_eq!(get(&ts, fc).dims(), fc_shape);
        assert!(ts.iter().any(|(n, _)| n.ends_with("running_var")));

        let all = read_tensors_from_bytes_with(
            &bytes,
            ReadOptions {
                keep_integer_tensors: true,
            },
        )
        .unwrap();
        assert_eq!(all.len(), total);
        let nbt = all
            .iter()
            .find(|(n, _)| n.ends_with("num_batches_tracked"))
            .unwrap();
        assert_eq!(nbt.1.dims(), &[] as &[usize]);
    }
}

#[test]
fn safetensors_dtypes_convert_and_integers_skip() {
    use safetensors::tensor::{serialize, Dtype, TensorView};
    let f16: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = [0.5f32, 3.0, -1.0]
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect();
    let f64b: Vec<u8> = [0.25f64, 1e-3]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let i64b: Vec<u8> = 7i64.to_le_bytes().to_vec();
    let views = vec![
        ("a", TensorView::new(Dtype::F16, vec![2], &f16).unwrap()),
        (
            "b",
            TensorView::new(Dtype::BF16, vec![3, 1], &bf16).unwrap(),
        ),
        ("c", TensorView::new(Dtype::F64, vec![1, 2], &f64b).unwrap()),
        ("n", TensorView::new(Dtype::I64, vec![], &i64b).unwrap()),
    ];
    let bytes = serialize(views, None).unwrap();
    let ts = read_tensors_from_bytes(&bytes).unwrap();
    let names: Vec<&str> = ts.iter().map(|(n, _)| n.as_str()).collect();
    // Data-offset order; the safetensors writer puts wider dtypes first.
    assert_eq!(names, ["c", "b", "a"]);
    assert_eq!(values(get(&ts, "a")), [1.5, -2.0]);
    assert_eq!(get(&ts, "b").dims(), [3, 1]);
    assert_eq!(values(get(&ts, "b")), [0.5, 3.0, -1.0]);
    assert_eq!(values(get(&ts, "c")), [0.25, 1e-3f64 as f32]);
    let all = read_tensors_from_bytes_with(
        &bytes,
        ReadOptions {
            keep_integer_tensors: true,
        },
    )
    .unwrap();
    assert_eq!(values(get(&all, "n")), [7.0]);
}

// ---------------------------------------------------------------- tiny .pth fixtures

/// (name, shape, values) in file order from expected.json (computed in Python).
fn expected(section: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let text = std::fs::read_to_string(data("expected.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json[section]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let vals = v["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_f64().unwrap() as f32)
                .collect();
            (v["name"].as_str().unwrap().to_owned(), shape, vals)
        })
        .collect()
}

fn check_against_expected(file: &str, section: &str, format: WeightFormat) {
    let path = data(file);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(detect_format(&bytes).unwrap(), format, "{file}");
    let ts = read_tensors(&path).unwrap();
    let want = expected(section);
    let got_names: Vec<&str> = ts.iter().map(|(n, _)| n.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        got_names, want_names,
        "{file}: names in file order, int64 skipped"
    );
    for ((name, t), (_, shape, vals)) in ts.iter().zip(&want) {
        assert_eq!(t.dtype(), DType::F32);
        assert!(t.is_contiguous());
        assert_eq!(t.dims(), &shape[..], "{file} {name}");
        assert_eq!(&values(t), vals, "{file} {name}");
    }
}

#[test]
fn tiny_legacy_pth_matches_python() {
    check_against_expected("tiny_legacy.pth", "state_dict", WeightFormat::TorchLegacy);
    check_against_expected("tiny_legacy_view.pth", "view", WeightFormat::TorchLegacy);
}

#[test]
fn tiny_zip_pth_matches_python() {
    check_against_expected("tiny_zip.pth", "state_dict", WeightFormat::TorchZip);
    // {"epoch": 3, "state_dict": OrderedDict, "optimizer": {...}}: the state_dict key is used.
    check_against_expected("tiny_zip_nested.pth", "state_dict", WeightFormat::TorchZip);
}

#[test]
fn permuted_conv_weight_is_gathered_by_stride() {
    // conv.weight is OIHW (4,3,2,2) over an HWIO (2,2,3,4) storage s[i] = 0.5 i - 7.
    for file in ["tiny_legacy.pth", "tiny_zip.pth"] {
        let ts = read_tensors(&data(file)).unwrap();
        let w = get(&ts, "conv.weight");
        assert_eq!(w.dims(), [4, 3, 2, 2]);
        let v = values(w);
        for o in 0..4 {
            for i in 0..3 {
                for h in 0..2 {
                    for x in 0..2 {
                        let flat = ((o * 3 + i) * 2 + h) * 2 + x;
                        let storage = o + 4 * i + 24 * h + 12 * x;
                        assert_eq!(
                            v[flat],
                            0.5 * storage as f32 - 7.0,
                            "{file} [{o},{i},{h},{x}]"
                        );
                    }
                }
            }
        }
    }
}

/// Real files written by torch.save (zip format) from candle's test suite: int64 tensors,
/// one of them Fortran-ordered (stride (1,2,6)), one nested under a `model_state_dict` key.
#[test]
fn real_torch_zip_files_from_candle() {
    let keep = ReadOptions {
        keep_integer_tensors: true,
    };
    let read = |f: &str| read_tensors_from_bytes_with(&std::fs::read(data(f)).unwrap(), keep);

    let ts = read("candle_test.pt").unwrap();
    assert_eq!(ts.len(), 1);
    assert_eq!(ts[0].0, "test");
    assert_eq!(
        ts[0].1.to_vec2::<f32>().unwrap(),
        [[1., 2., 3., 4.], [5., 6., 7., 8.]]
    );
    // Integer-only file: nothing left with default options.
    assert!(read_tensors(&data("candle_test.pt")).unwrap().is_empty());

    let ts = read("candle_fortran_tensor_3d.pth").unwrap();
    assert_eq!(ts[0].0, "tensor_fortran");
    assert_eq!(ts[0].1.dims(), [2, 3, 4]);
    let want: Vec<f32> = (1..=24).map(|x| x as f32).collect();
    assert_eq!(
        values(&ts[0].1),
        want,
        "np.arange(1,25).reshape(2,3,4) in F order"
    );

    // {"model_state_dict": OrderedDict(test=...)}: the nested state dict is used.
    let ts = read("candle_test_with_key.pt").unwrap();
    assert_eq!(ts.len(), 1);
    assert_eq!(ts[0].0, "test");
    assert_eq!(values(&ts[0].1), [1., 2., 3., 4., 5., 6., 7., 8.]);
}

// ---------------------------------------------------------------- errors and robustness

#[test]
fn errors_name_the_problem() {
    let e = read_tensors(Path::new("/nonexistent/x.pth")).unwrap_err();
    assert!(matches!(e, adaptivenet_core::CoreError::Io { .. }), "{e}");
    let e = read_tensors_from_bytes(b"hello world").unwrap_err();
    assert!(e.to_string().contains("unrecognised"), "{e}");

    // Legacy file cut inside the data section: a short storage is an error naming the storage.
    let bytes = std::fs::read(data("tiny_legacy.pth")).unwrap();
    let e = read_tensors_from_bytes(&bytes[..bytes.len() - 3]).unwrap_err();
    assert!(e.to_string().contains("storage 5"), "{e}");

    // A view reaching past its storage names the tensor: shrink conv.weight's numel is not
    // possible in place, so bump fc.weight's storage offset (BININT1 0 after its persid).
    let mut bad = std::fs::read(data("tiny_legacy.pth")).unwrap();
    let at = find(&bad, b"fc.weight").unwrap();
    let persid = at + find(&bad[at..], b"Q").unwrap();
    assert_eq!(&bad[persid + 1..persid + 3], b"K\x00");
    bad[persid + 2] = 5;
    let e = read_tensors_from_bytes(&bad).unwrap_err();
    assert!(
        e.to_string().contains("tensor fc.weight") && e.to_string().contains("too short"),
        "{e}"
    );
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A tiny deterministic PRNG (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn small_safetensors() -> Vec<u8> {
    use safetensors::tensor::{serialize, Dtype, TensorView};
    let a: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let b: Vec<u8> = (0..4)
        .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
        .collect();
    let n = 3i64.to_le_bytes();
    serialize(
        vec![
            ("w", TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap()),
            ("h", TensorView::new(Dtype::F16, vec![4], &b).unwrap()),
            ("n", TensorView::new(Dtype::I64, vec![], &n).unwrap()),
        ],
        None,
    )
    .unwrap()
}

/// Truncations at every length and thousands of random byte flips of a valid file of each
/// format must give `Ok` or `Err`, never a panic (a panic fails the test). Set
/// `WEIGHTS_FUZZ_ROUNDS` for a longer soak.
#[test]
fn corrupted_inputs_never_panic() {
    let mut inputs = vec![("safetensors", small_safetensors())];
    for f in [
        "tiny_legacy.pth",
        "tiny_legacy_view.pth",
        "tiny_zip.pth",
        "tiny_zip_nested.pth",
        "candle_fortran_tensor_3d.pth",
    ] {
        inputs.push((f, std::fs::read(data(f)).unwrap()));
    }
    let keep = ReadOptions {
        keep_integer_tensors: true,
    };
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (mut ok, mut err) = (0usize, 0usize);
    let mut tally = |r: adaptivenet_core::Result<Vec<(String, Tensor)>>| match r {
        Ok(_) => ok += 1,
        Err(_) => err += 1,
    };
    let rounds: usize = std::env::var("WEIGHTS_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    for (name, valid) in &inputs {
        assert!(read_tensors_from_bytes(valid).is_ok(), "{name} must load");
        for len in 0..valid.len() {
            tally(read_tensors_from_bytes(&valid[..len]));
        }
        for round in 0..rounds {
            let mut b = valid.clone();
            let flips = 1 + rng.below(if round % 10 == 0 { 16 } else { 3 });
            for _ in 0..flips {
                let i = rng.below(b.len());
                b[i] = match rng.below(4) {
                    0 => rng.next() as u8,
                    1 => b[i] ^ (1 << rng.below(8)),
                    2 => 0xff,
                    _ => 0,
                };
            }
            if round % 3 == 0 {
                tally(read_tensors_from_bytes_with(&b, keep));
            } else {
                tally(read_tensors_from_bytes(&b));
            }
        }
    }
    println!("corrupted inputs: {ok} Ok, {err} Err");
    assert!(err > 0);
}

// ---------------------------------------------------------------- asset tier

const LITE0: &str = "efficientnet-lite0/efficientnet-lite0-57934424.pth";

fn asset_or_skip(rel: &str) -> Option<PathBuf> {
    match adaptivenet_core::assets::asset(rel) {
        Some(p) => Some(p),
        None if adaptivenet_core::assets::require_assets() => panic!(
            "asset {rel} missing under {} and ADAPTIVENET_REQUIRE_ASSETS=1 (run scripts/fetch-assets.sh)",
            adaptivenet_core::assets_dir().display()
        ),
        None => {
            println!(
                "skipping: asset {rel} not found under {} (run scripts/fetch-assets.sh)",
                adaptivenet_core::assets_dir().display()
            );
            None
        }
    }
}

/// The real EfficientNet-Lite0 checkpoint (legacy format, 50 conv weights with permuted
/// strides): 296 tensors in the file, of which 49 are int64 `num_batches_tracked` (skipped),
/// leaving 247 float tensors with 4,694,024 parameters (DATA.md's 4,694,073 counts the 49
/// one-element counters too).
#[test]
fn efficientnet_lite0_legacy_checkpoint() {
    let Some(path) = asset_or_skip(LITE0) else {
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(detect_format(&bytes).unwrap(), WeightFormat::TorchLegacy);
    let ts = read_tensors(&path).unwrap();
    let all = read_tensors_from_bytes_with(
        &bytes,
        ReadOptions {
            keep_integer_tensors: true,
        },
    )
    .unwrap();
    assert_eq!(all.len(), 296);
    assert_eq!(
        all.iter()
            .filter(|(n, _)| n.ends_with("num_batches_tracked"))
            .count(),
        49
    );
    assert_eq!(ts.len(), 247);
    let params: usize = ts.iter().map(|(_, t)| t.elem_count()).sum();
    assert_eq!(params, 4_694_024);
    let with_ints: usize = all.iter().map(|(_, t)| t.elem_count()).sum();
    assert_eq!(with_ints, 4_694_073);
    assert_eq!(ts[0].0, "_conv_stem.weight");
    assert_eq!(get(&ts, "_conv_stem.weight").dims(), [32, 3, 3, 3]);
    assert_eq!(get(&ts, "_fc.weight").dims(), [1000, 1280]);
    assert_eq!(
        get(&ts, "_blocks.15._project_conv.weight").dims(),
        [320, 1152, 1, 1]
    );
    assert!(ts
        .iter()
        .all(|(_, t)| t.dtype() == DType::F32 && t.is_contiguous()));

    // Strided reading, checked by hand against the raw storage: _conv_stem.weight has shape
    // (32,3,3,3), stride (1,32,288,96), offset 0, so element [o,i,h,w] is raw[o + 32i + 288h +
    // 96w] of its storage. Locate that storage's bytes: its key is the first BINUNICODE after
    // 'torch FloatStorage', and the data section lists storages by sorted key.
    let raw = lite0_storage(&bytes, "_conv_stem.weight");
    assert_eq!(raw.len(), 864);
    let stem = values(get(&ts, "_conv_stem.weight"));
    let mut differs_from_flat = false;
    for o in 0..32 {
        for i in 0..3 {
            for h in 0..3 {
                for w in 0..3 {
                    let flat = ((o * 3 + i) * 3 + h) * 3 + w;
                    let want = raw[o + 32 * i + 288 * h + 96 * w];
                    assert_eq!(stem[flat], want, "[{o},{i},{h},{w}]");
                    differs_from_flat |= stem[flat] != raw[flat];
                }
            }
        }
    }
    assert!(differs_from_flat, "a plain reshape would not match");
    // BatchNorm running variances are non-negative (28 BNs have exact-zero dead channels) and
    // every value is finite; a mis-assigned storage would break this.
    for (n, t) in &ts {
        let v = values(t);
        assert!(v.iter().all(|x| x.is_finite()), "{n}");
        if n.ends_with("running_var") {
            assert!(v.iter().all(|&x| x >= 0.0), "{n}");
        }
    }
    // Known values, read once with Python's pickle module from the same file.
    let var = values(get(&ts, "_bn0.running_var"));
    assert_eq!(var.len(), 32);
    assert_eq!(&var[..3], [1.631_428_6, 70.371_574, 14.107_358]);
    assert_eq!(var[11], 0.0);
}

/// The f32 storage behind `name` in a legacy checkpoint, found independently of the reader:
/// parse the storage-key list (pickle 5) by scanning, then walk the data section.
fn lite0_storage(bytes: &[u8], name: &str) -> Vec<f32> {
    // The key of `name`'s storage: the BINUNICODE after the tensor name's next 'storage' tuple.
    let at = find(bytes, name.as_bytes()).unwrap();
    let st = at + find(&bytes[at..], b"FloatStorage").unwrap();
    let x = st + find(&bytes[st..], b"X").unwrap();
    let klen = u32::from_le_bytes(bytes[x + 1..x + 5].try_into().unwrap()) as usize;
    let key = std::str::from_utf8(&bytes[x + 5..x + 5 + klen])
        .unwrap()
        .to_owned();

    // Pickle 5 (the key list) ends with ".", right before the data section. Find its start: the
    // last "\x80\x02]" (PROTO 2, EMPTY_LIST) in the file before the data.
    let list_start = (0..bytes.len() - 3)
        .find(|&i| bytes[i..].starts_with(b"\x80\x02]q\x00(X"))
        .unwrap();
    let mut keys = Vec::new();
    let mut p = list_start + 6;
    while bytes[p] == b'X' {
        let n = u32::from_le_bytes(bytes[p + 1..p + 5].try_into().unwrap()) as usize;
        keys.push(String::from_utf8(bytes[p + 5..p + 5 + n].to_vec()).unwrap());
        p += 5 + n;
        // skip BINPUT q/x or LONG_BINPUT r/xxxx
        p += match bytes[p] {
            b'q' => 2,
            b'r' => 5,
            _ => 0,
        };
    }
    assert_eq!(keys.len(), 296);
    // Then APPENDS 'e' and STOP '.'.
    assert_eq!(&bytes[p..p + 2], b"e.");
    p += 2;
    // Element sizes: the only int64 storages are the 49 one-element `num_batches_tracked`
    // counters, and no float tensor of this model has a single element.
    let mut longs = 0;
    for k in keys {
        let count = i64::from_le_bytes(bytes[p..p + 8].try_into().unwrap()) as usize;
        let esize = if count == 1 { 8 } else { 4 };
        longs += usize::from(count == 1);
        let body = &bytes[p + 8..p + 8 + count * esize];
        if k == key {
            return body
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
        }
        p += 8 + count * esize;
    }
    panic!("storage {key} not found ({longs} int64 storages passed)");
}
