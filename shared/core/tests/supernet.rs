//! Supernet IR, branches, subnet codes, counting and export.
mod common;

use adaptivenet_core::model::{ArchDescriptor, BlockSpec, Model};
use adaptivenet_core::supernet::branches::{build_supernet, merge_source, supernet_spec};
use adaptivenet_core::supernet::{BranchKind, Choice, ModuleKey, Subnet, SupernetConfig};
use adaptivenet_core::CoreError;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;

fn resnet20() -> ArchDescriptor {
    ArchDescriptor::from_json(
        br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[3,3,3],
            "widths":[16,32,64],"in_channels":1,"num_classes":10}"#,
    )
    .unwrap()
}

fn tv_resnet(block: &str, layers: &[usize]) -> ArchDescriptor {
    ArchDescriptor::from_value(serde_json::json!({
        "family": "torchvision.resnet", "block": block, "layers": layers, "num_classes": 1000
    }))
    .unwrap()
}

fn all_branches() -> SupernetConfig {
    SupernetConfig::from_names(&["merge2", "merge3", "prune1", "prune2"], 7).unwrap()
}

#[test]
fn resnet20_has_the_reference_parameter_count() {
    assert_eq!(resnet20().spec.num_params(), 272_186);
}

#[test]
fn merge_only_counts_match_the_paper() {
    let m = SupernetConfig::merge_only();
    assert_eq!(supernet_spec(&resnet20().spec, &m).count(), 149);
    assert_eq!(
        supernet_spec(&tv_resnet("bottleneck", &[3, 4, 6, 3]).spec, &m).count(),
        10_609
    );
    let r101 = supernet_spec(&tv_resnet("bottleneck", &[3, 4, 23, 3]).spec, &m).count();
    println!("ResNet-101 merge-only subnets: {r101}");
    assert!((3.3e8..3.4e8).contains(&(r101 as f64)), "{r101}");
    // The DP agrees with brute-force enumeration where that is feasible.
    let spec = supernet_spec(&resnet20().spec, &all_branches());
    let all = spec.enumerate(1_000_000).unwrap();
    assert_eq!(all.len() as u128, spec.count());
    let distinct: std::collections::HashSet<String> = all.iter().map(|s| s.to_string()).collect();
    assert_eq!(distinct.len(), all.len());
    for s in &all {
        spec.validate(s).unwrap();
    }
    println!("ResNet-20 merge+prune subnets: {}", spec.count());
}

#[test]
fn subnet_codes_round_trip_and_errors_name_the_position() {
    let spec = supernet_spec(&resnet20().spec, &all_branches());
    for code in ["000000000", "2xx1xP0p0", "1x1x1x2xx", "0000000P0"] {
        let s = Subnet::parse(code).unwrap();
        assert_eq!(s.to_string(), code);
        spec.validate(&s).unwrap();
    }
    let pos = |code: &str| match spec.validate(&Subnet(
        code.chars()
            .map(|c| Choice::from_symbol(c).unwrap())
            .collect(),
    )) {
        Err(CoreError::InvalidSubnet { position, .. }) => position,
        other => panic!("{code}: expected InvalidSubnet, got {other:?}"),
    };
    assert_eq!(pos("2x0000000"), 2); // merge-3 needs two covered markers
    assert_eq!(pos("x00000000"), 0); // covered without a merge
    assert_eq!(pos("00000000P"), 8); // the last block is not pruned
    assert_eq!(pos("0000000002"), 9); // too long
    assert_eq!(pos("00000002x"), 7); // merge-3 does not fit
    match Subnet::parse("00a") {
        Err(CoreError::InvalidSubnet { position: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn sampling_is_valid_deterministic_and_can_require_a_branch() {
    let spec = supernet_spec(&resnet20().spec, &all_branches());
    let draw = |seed| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..200)
            .map(|_| spec.sample(&mut rng, true).unwrap())
            .collect::<Vec<_>>()
    };
    let a = draw(1);
    assert_eq!(a, draw(1));
    assert_ne!(a, draw(2));
    for s in &a {
        spec.validate(s).unwrap();
        assert!(s.uses_branch());
    }
    // Without branches there is nothing to sample with require_branch.
    let none = supernet_spec(
        &resnet20().spec,
        &SupernetConfig {
            branches: vec![],
            seed: 0,
        },
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    assert!(none.sample(&mut rng, true).is_err());
    assert_eq!(none.sample(&mut rng, false).unwrap(), Subnet::original(9));
}

#[test]
fn weighted_sampling_shifts_paths_towards_fewer_blocks() {
    // Merge-only (as elastification samples): fewer blocks means more merges.
    let spec = supernet_spec(&resnet20().spec, &SupernetConfig::merge_only());
    let mean_blocks = |w: f64| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let n = 4000;
        let total: usize = (0..n)
            .map(|_| {
                let s = spec.sample_weighted(&mut rng, true, w).unwrap();
                spec.validate(&s).unwrap();
                assert!(s.uses_branch());
                s.steps().count()
            })
            .sum();
        total as f64 / n as f64
    };
    // Weight 1 is `sample`, draw for draw.
    let mut a = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut b = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for _ in 0..100 {
        assert_eq!(
            spec.sample(&mut a, true).unwrap(),
            spec.sample_weighted(&mut b, true, 1.0).unwrap()
        );
    }
    // Exact means of the left-to-right walk on this 9-block chain (require_branch changes
    // them by < 0.01): 4.91 blocks at weight 1, 4.48 at 0.5; 4,000 draws have a standard
    // error of ~0.015.
    let (uniform, biased) = (mean_blocks(1.0), mean_blocks(0.5));
    assert!((uniform - 4.91).abs() < 0.08, "weight 1: {uniform}");
    assert!((biased - 4.48).abs() < 0.08, "weight 0.5: {biased}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for bad in [0.0, -1.0, f64::NAN] {
        assert!(spec.sample_weighted(&mut rng, true, bad).is_err());
    }
}

#[test]
fn all_original_subnet_is_the_oracle_bit_for_bit_and_branches_run() {
    let oracle = Model::init(&resnet20().spec, 3).unwrap();
    let sn = build_supernet(&oracle, &all_branches()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
    let want = oracle.forward(&x).unwrap();
    let got = sn.forward(&Subnet::original(9), &x).unwrap();
    assert_eq!(common::max_abs_diff(&want, &got), 0.0);
    // Every module runs and produces the chain's shape at its span's end.
    let shapes = sn.spec.oracle.block_shapes(28, 28);
    let mut h_in = vec![sn.forward_stem(&x).unwrap()];
    for b in 0..9 {
        let next = sn
            .forward_module(ModuleKey::new(b, Choice::Original), &h_in[b])
            .unwrap();
        h_in.push(next);
    }
    for (i, choices) in sn.spec.positions.iter().enumerate() {
        for c in choices {
            let y = sn
                .forward_module(ModuleKey::new(i, c.id), &h_in[i])
                .unwrap();
            let [ch, hh, ww] = shapes[i + c.span];
            assert_eq!(y.dims(), &[2, ch, hh, ww], "position {i} choice {}", c.id);
        }
    }
    // Materialised subnets compute exactly what the supernet computes.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for _ in 0..5 {
        let s = sn.spec.sample(&mut rng, true).unwrap();
        let m = sn.materialize(&s).unwrap();
        assert_eq!(m.spec.blocks.len(), s.steps().count());
        let d = common::max_abs_diff(&m.forward(&x).unwrap(), &sn.forward(&s, &x).unwrap());
        assert_eq!(d, 0.0, "{s}");
    }
}

#[test]
fn branches_inherit_matching_tensors_and_prune_by_magnitude() {
    let oracle = Model::init(&resnet20().spec, 11).unwrap();
    let sn = build_supernet(&oracle, &all_branches()).unwrap();
    let eq = |a: &Tensor, b: &Tensor| common::max_abs_diff(a, b) == 0.0;
    // Merge-2 at 0: blocks 0-1 are 16→16 stride 1: an exact copy of block 0.
    let m = sn.module(ModuleKey::new(0, Choice::Merge2)).unwrap();
    for (n, t) in &oracle.blocks[0] {
        assert!(eq(t, &m[n]), "{n} copied");
    }
    // Merge-2 at 2 spans 16→32 (crosses the stage): the paper's shape (block 2's inner width
    // 16) started from block 3 width-pruned: its output BN and projection copied whole.
    let m = sn.module(ModuleKey::new(2, Choice::Merge2)).unwrap();
    assert_eq!(m["conv1.weight"].dims(), &[16, 16, 3, 3]);
    assert_eq!(m["conv2.weight"].dims(), &[32, 16, 3, 3]);
    for name in ["bn2.running_var", "bn2.weight", "downsample.0.weight"] {
        assert!(eq(&oracle.blocks[3][name], &m[name]), "{name}");
    }
    assert!(m.contains_key("downsample.0.weight"));
    match &sn
        .spec
        .choice(ModuleKey::new(2, Choice::Merge2))
        .unwrap()
        .block
    {
        BlockSpec::Basic {
            stride: 2,
            proj: true,
            cout: 32,
            ..
        } => {}
        b => panic!("{b:?}"),
    }
    // Prune-2 at 0 keeps round(16 * 0.6) = 10 inner channels: the ones with the largest L2.
    let p = sn
        .module(ModuleKey::new(0, BranchKind::Prune2.choice()))
        .unwrap();
    assert_eq!(p["conv1.weight"].dims(), &[10, 16, 3, 3]);
    let w = &oracle.blocks[0]["conv1.weight"];
    let norms: Vec<f32> = w.sqr().unwrap().sum((1, 2, 3)).unwrap().to_vec1().unwrap();
    let mut order: Vec<usize> = (0..16).collect();
    order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]));
    let mut kept: Vec<usize> = order[..10].to_vec();
    kept.sort();
    let pn: Vec<f32> = p["conv1.weight"]
        .sqr()
        .unwrap()
        .sum((1, 2, 3))
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> = kept.iter().map(|&i| norms[i]).collect();
    assert_eq!(pn, want);
    assert_eq!(p["conv2.weight"].dims(), &[16, 10, 3, 3]);
    assert!(eq(&p["bn2.weight"], &oracle.blocks[0]["bn2.weight"]));
}

#[test]
fn mbconv_rules_hold_for_efficientnet_lite0() {
    let arch = ArchDescriptor::from_json(br#"{"family":"efficientnet_lite"}"#).unwrap();
    // DATA.md: the real file holds 296 tensors with 4,694,073 numbers: parameters, BN running
    // statistics and one `num_batches_tracked` counter per BN layer.
    let shapes = adaptivenet_core::model::expected_shapes(&arch.spec);
    let floats: usize = shapes
        .iter()
        .map(|(_, _, s)| s.iter().product::<usize>())
        .sum();
    let bn_layers = shapes
        .iter()
        .filter(|(_, n, _)| n.ends_with("running_mean"))
        .count();
    assert_eq!(bn_layers, 49);
    assert_eq!(floats + bn_layers, 4_694_073);
    assert_eq!(shapes.len() + bn_layers, 296);
    let spec = supernet_spec(&arch.spec, &all_branches());
    let n = spec.num_positions();
    assert_eq!(n, 16);
    for (i, cs) in spec.positions.iter().enumerate() {
        for c in cs {
            if c.span > 1 {
                let strided = arch.spec.blocks[i..i + c.span]
                    .iter()
                    .filter(|b| b.stride() != 1)
                    .count();
                assert!(
                    strided <= 1,
                    "position {i} merge {} spans {strided} strided",
                    c.id
                );
            }
            if c.id < Choice::Original {
                assert!(i != 0 && i != n - 1, "position {i} must not be pruned");
            }
        }
    }
    // Every merge that crosses a stride-2 boundary twice is absent: position 1 (24, s2),
    // blocks 1..=3 contain strides at 1 and 3.
    assert!(spec.choice(ModuleKey::new(1, Choice::Merge3)).is_none());
    assert!(spec.choice(ModuleKey::new(1, Choice::Merge2)).is_some());
    println!("EfficientNet-Lite0 subnets (merge+prune): {}", spec.count());
}

/// An MBConv merge whose span crosses a stage boundary starts as the span's one reshaping
/// block, copied whole (the span with its residual blocks dropped), not as its first block
/// with a random projection; a span with two reshaping blocks keeps the paper's rule.
#[test]
fn mbconv_stage_crossing_merges_copy_the_reshaping_block() {
    let arch = ArchDescriptor::from_json(br#"{"family":"efficientnet_lite"}"#).unwrap();
    let oracle = Model::init(&arch.spec, 5).unwrap();
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap();
    let blocks = &arch.spec.blocks;
    let shapes = arch.spec.block_shapes(64, 64);
    let reshapes = |b: &BlockSpec| b.stride() != 1 || b.cin() != b.cout();
    let eq = |a: &Tensor, b: &Tensor| common::max_abs_diff(a, b) == 0.0;
    let mut copied = 0;
    for (i, cs) in sn.spec.positions.iter().enumerate() {
        for c in cs.iter().filter(|c| c.span > 1) {
            let src = merge_source(blocks, i, c.span);
            let r: Vec<usize> = (i..i + c.span).filter(|&j| reshapes(&blocks[j])).collect();
            let key = ModuleKey::new(i, c.id);
            if r.len() == 1 && r[0] != i {
                assert_eq!(src, r[0], "position {i} {}", c.id);
                assert_eq!(c.block, blocks[src], "position {i} {}: spec", c.id);
                let m = sn.module(key).unwrap();
                for (name, t) in &oracle.blocks[src] {
                    assert!(eq(&m[name], t), "position {i} {}: {name} not copied", c.id);
                }
                let [ch, h, w] = shapes[i];
                let x = Tensor::randn(0f32, 1.0, (2, ch, h, w), &Device::Cpu).unwrap();
                let want = sn
                    .forward_module(ModuleKey::new(src, Choice::Original), &x)
                    .unwrap();
                let got = sn.forward_module(key, &x).unwrap();
                assert_eq!(common::max_abs_diff(&want, &got), 0.0);
                copied += 1;
            } else {
                assert_eq!(src, i, "position {i} {}", c.id);
            }
        }
    }
    // Lite0's boundaries: 2->3, 4->5, 7->8, 10->11, 14->15 by merge-2 and merge-3 (minus the
    // spans past the end or over two strides).
    assert!(copied >= 8, "only {copied} stage-crossing merges");
    // Blocks 0 (32 -> 16, no expansion) and 1 (16 -> 24, stride 2) both reshape: block 0's
    // copy with a fresh projection, as the paper builds it.
    assert_eq!(merge_source(blocks, 0, 2), 0);
    let m0 = sn.module(ModuleKey::new(0, Choice::Merge2)).unwrap();
    assert_eq!(m0["project.conv.weight"].dims(), &[24, 32, 1, 1]);
}

/// A ResNet merge whose span crosses a stage boundary keeps the paper's shape (the first
/// block's inner width) but starts as the span's strided block width-pruned to it: its conv1
/// filters are that block's largest ones, conv2 reads exactly those channels, and its output
/// BN and shortcut projection are that block's. Other merges copy their first block.
#[test]
fn resnet_stage_crossing_merges_start_from_the_strided_block() {
    let arch = resnet20();
    let oracle = Model::init(&arch.spec, 6).unwrap();
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap();
    let blocks = &arch.spec.blocks;
    let eq = |a: &Tensor, b: &Tensor| a.dims() == b.dims() && common::max_abs_diff(a, b) == 0.0;
    let mut crossing = 0;
    for (i, cs) in sn.spec.positions.iter().enumerate() {
        for c in cs.iter().filter(|c| c.span > 1) {
            let src = merge_source(blocks, i, c.span);
            let m = sn.module(ModuleKey::new(i, c.id)).unwrap();
            // The paper's shape either way.
            assert_eq!(c.block.inner(), blocks[i].inner(), "position {i} {}", c.id);
            if src == i {
                assert!(eq(&m["conv1.weight"], &oracle.blocks[i]["conv1.weight"]));
                continue;
            }
            crossing += 1;
            assert!(
                blocks[src].stride() == 2 && src > i,
                "position {i} {}",
                c.id
            );
            let s = &oracle.blocks[src];
            assert!(c.block.inner() < blocks[src].inner());
            for name in ["bn2.weight", "bn2.running_var", "downsample.0.weight"] {
                assert!(eq(&m[name], &s[name]), "position {i} {}: {name}", c.id);
            }
            // conv1's filters and conv2's input channels are the same subset of the source's.
            let w1 = s["conv1.weight"].flatten_from(1).unwrap();
            let kept = m["conv1.weight"].flatten_from(1).unwrap();
            let w2 = &s["conv2.weight"];
            for k in 0..c.block.inner() {
                let row = kept.get(k).unwrap();
                let j = (0..blocks[src].inner())
                    .find(|&j| eq(&w1.get(j).unwrap(), &row))
                    .unwrap_or_else(|| panic!("position {i}: filter {k} is not the source's"));
                let want = w2.narrow(1, j, 1).unwrap();
                let got = m["conv2.weight"].narrow(1, k, 1).unwrap();
                assert!(
                    eq(&want, &got),
                    "position {i}: conv2 input {k} is not source's {j}"
                );
            }
        }
    }
    // Merge-2 at 2 and 5, merge-3 at 1, 2, 4 and 5.
    assert_eq!(crossing, 6);
}

/// Every EfficientNet-Lite0 module, branches included (a merge at block 0 is a stride-2
/// MBConv block without expansion, a shape no oracle block has), computes the same folded
/// for inference as unfolded.
#[test]
fn folded_lite0_modules_match_unfolded() {
    let arch = ArchDescriptor::from_json(br#"{"family":"efficientnet_lite"}"#).unwrap();
    let oracle = Model::init(&arch.spec, 8).unwrap();
    let sn = build_supernet(&oracle, &all_branches()).unwrap();
    let mut folded = sn.clone();
    folded.fold().unwrap();
    let shapes = arch.spec.block_shapes(64, 64);
    for &key in sn.modules.keys() {
        let [c, h, w] = shapes[key.pos];
        let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &Device::Cpu).unwrap();
        let want = sn.forward_module(key, &x).unwrap();
        let got = folded.forward_module(key, &x).unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = common::max_abs_diff(&want, &got);
        assert!(
            d <= 1e-4 * (1.0 + scale),
            "{key}: folded differs by {d} (scale {scale})"
        );
    }
}

#[test]
fn folded_supernet_matches_unfolded_and_keeps_the_oracle_exact() {
    let oracle = Model::init(&resnet20().spec, 21).unwrap();
    let mut sn = build_supernet(&oracle, &all_branches()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let subnets: Vec<Subnet> = (0..6)
        .map(|_| sn.spec.sample(&mut rng, true).unwrap())
        .collect();
    let before: Vec<Tensor> = subnets.iter().map(|s| sn.forward(s, &x).unwrap()).collect();
    sn.fold().unwrap();
    for (s, want) in subnets.iter().zip(&before) {
        let d = common::max_abs_diff(want, &sn.forward(s, &x).unwrap());
        assert!(d < 1e-4, "{s}: folded differs by {d}");
    }
    let folded_oracle = oracle.folded().unwrap();
    let d = common::max_abs_diff(
        &folded_oracle.forward(&x).unwrap(),
        &sn.forward(&Subnet::original(9), &x).unwrap(),
    );
    assert_eq!(d, 0.0);
}

/// Elastification runs the frozen original blocks on BN-folded weights; when a branch sits
/// before them, their input carries a gradient that must flow through (the fused inference
/// kernel has no backward, so a folded module must switch to the differentiable conv).
#[test]
fn folded_modules_pass_gradients_to_a_tracked_input() {
    let oracle = Model::init(&resnet20().spec, 5).unwrap();
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap();
    let mut folded = sn.clone();
    folded.fold().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let px: Vec<f32> = (0..2 * 28 * 28)
        .map(|_| rand::Rng::random_range(&mut rng, -2.0f32..2.0))
        .collect();
    let x = Tensor::from_vec(px, (2, 1, 28, 28), &Device::Cpu).unwrap();
    let h0 = sn.forward_stem(&x).unwrap();
    // Block 3 opens the second stage: stride 2 and a projection shortcut (conv + BN).
    let grad_through = |net: &adaptivenet_core::supernet::Supernet| {
        let v = candle_core::Var::from_tensor(&h0).unwrap();
        let mut h = v.as_tensor().clone();
        for pos in 0..4 {
            h = net
                .forward_module(ModuleKey::new(pos, Choice::Original), &h)
                .unwrap();
        }
        let loss = h.sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        g.get(v.as_tensor()).expect("input gradient").clone()
    };
    let want = grad_through(&sn);
    let got = grad_through(&folded);
    // Relative L2 error: folding moves pre-activations by ~1e-6, which can flip a ReLU that
    // sits at ~0 and change that one element's gradient outright (a max-abs comparison then
    // fails on unlucky inputs); a lost or wrong gradient path is off by O(1).
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    let rel = norm(&(&want - &got).unwrap()) / norm(&want);
    assert!(norm(&want) > 0.0);
    println!("relative L2 error {rel:e}");
    assert!(
        rel < 1e-3,
        "folded input gradient off by {rel} (relative L2)"
    );
}

#[test]
fn inference_mode_bn_passes_gradients_to_trainable_weights() {
    // A branch training on fixed BN statistics (`forward_module_with` on variables): its
    // gradients for the conv weights and the BN affine match central finite differences.
    use adaptivenet_core::model::Params;
    let oracle = Model::init(&resnet20().spec, 7).unwrap();
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap();
    // Merge-2 at block 2: it spans into the second stage (stride 2, a projection).
    let key = ModuleKey::new(2, Choice::Merge2);
    let base = sn.module(key).unwrap().clone();
    let x = sn.forward_stem(&seeded_batch(2, 9)).unwrap();
    let h = (0..2).try_fold(x, |h, pos| {
        sn.forward_module(ModuleKey::new(pos, Choice::Original), &h)
    });
    let x = h.unwrap();
    let out = sn.forward_module_with(key, &base, &x).unwrap();
    let r = seeded_batch(out.elem_count() / (28 * 28), 4)
        .reshape(out.dims())
        .unwrap();
    // The loss is summed in f64: an f32 sum's rounding, divided by a small step, swamps the
    // finite differences.
    let r64 = r.to_dtype(DType::F64).unwrap();
    let loss_of = |p: &Params| -> f64 {
        let y = sn.forward_module_with(key, p, &x).unwrap();
        (y.to_dtype(DType::F64).unwrap() * &r64)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let mut vars = Params::new();
    let mut handles = Vec::new();
    for (n, t) in &base {
        if n.ends_with("running_mean") || n.ends_with("running_var") {
            vars.insert(n.clone(), t.clone());
        } else {
            let v = candle_core::Var::from_tensor(t).unwrap();
            vars.insert(n.clone(), v.as_tensor().clone());
            handles.push((n.clone(), v));
        }
    }
    let y = sn.forward_module_with(key, &vars, &x).unwrap();
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut checked = 0;
    for (n, v) in &handles {
        let g: Vec<f32> = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {n}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        // A central difference across a ReLU kink is not a derivative: probe points until
        // two per tensor are smooth, i.e. steps of eps and eps / 2 agree within 0.5 %.
        let mut here = 0;
        for i in (0..w.len()).step_by((w.len() / 13).max(1)) {
            let fd = |eps: f32| {
                let at = |d: f32| {
                    let mut e = w.clone();
                    e[i] += d;
                    let mut p = base.clone();
                    let t = Tensor::from_vec(e, v.as_tensor().dims(), &Device::Cpu).unwrap();
                    p.insert(n.clone(), t);
                    loss_of(&p)
                };
                (at(eps) - at(-eps)) / (2.0 * f64::from(eps))
            };
            let eps = 1e-2f32 * w[i].abs().max(0.1);
            let (fd, fd_half) = (fd(eps), fd(eps / 2.0));
            if (fd - fd_half).abs() > 5e-3 * fd.abs().max(fd_half.abs()) + 5e-3 {
                continue;
            }
            let an = f64::from(g[i]);
            assert!(
                (fd - an).abs() <= 2e-2 * fd.abs().max(an.abs()) + 2e-2,
                "{n}[{i}]: autograd {an} vs finite difference {fd}"
            );
            checked += 1;
            here += 1;
            if here == 2 {
                break;
            }
        }
    }
    assert!(checked >= 8, "{checked} gradients checked");
}

/// A seeded `(n, 1, 28, 28)` batch, uniform in [-1, 2) (shifted and wider than the
/// freshly initialised BN statistics expect).
fn seeded_batch(n: usize, seed: u64) -> Tensor {
    use rand::Rng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * 28 * 28)
        .map(|_| rng.random::<f32>() * 3.0 - 1.0)
        .collect();
    Tensor::from_vec(v, (n, 1, 28, 28), &Device::Cpu).unwrap()
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt()
}

#[test]
fn bn_recalibration_fits_the_path_statistics_to_the_data() {
    use adaptivenet_core::model::TrainCtx;
    let oracle = Model::init(&resnet20().spec, 3).unwrap();
    let sn = build_supernet(&oracle, &SupernetConfig::merge_only()).unwrap();
    let subnet = Subnet::parse("2xx1x0000").unwrap();
    let (a, b) = (seeded_batch(32, 1), seeded_batch(32, 2));
    let path = |sn: &adaptivenet_core::supernet::Supernet, x: &Tensor, train: bool| {
        let mut h = sn.forward_stem(x).unwrap();
        for key in subnet.steps() {
            h = if train {
                let mut ctx = TrainCtx::new(0.1);
                let p = sn.module(key).unwrap().clone();
                sn.forward_module_train(key, &p, &h, &mut ctx).unwrap()
            } else {
                sn.forward_module(key, &h).unwrap()
            };
        }
        sn.forward_head(&h).unwrap()
    };
    // Recalibrated on one batch, eval mode on that batch is train mode on it: the running
    // statistics are the batch's (up to the unbiased variance, N/(N-1) with N >= 32*7*7).
    let mut one = sn.clone();
    one.modules
        .extend(sn.recalibrate_bn(&subnet, [&a], |_| true).unwrap());
    let train = path(&sn, &a, true);
    let recal = rel_l2(&path(&one, &a, false), &train);
    let plain = rel_l2(&path(&sn, &a, false), &train);
    assert!(recal < 2e-3, "recalibrated eval vs train mode: {recal}");
    assert!(
        plain > 20.0 * recal,
        "without recalibration: {plain} (recal {recal})"
    );
    // Only the path's modules (those selected) come back.
    let r2 = sn.recalibrate_bn(&subnet, [&a, &b], |_| true).unwrap();
    assert_eq!(r2.len(), subnet.steps().count());
    let branches = sn
        .recalibrate_bn(&subnet, [&a], |c| c != Choice::Original)
        .unwrap();
    assert_eq!(
        branches.keys().copied().collect::<Vec<_>>(),
        [
            ModuleKey::new(0, Choice::Merge3),
            ModuleKey::new(3, Choice::Merge2)
        ]
    );
    // Two batches: each statistic is the mean of the two single-batch ones.
    let (ra, rb) = (
        sn.recalibrate_bn(&subnet, [&a], |_| true).unwrap(),
        sn.recalibrate_bn(&subnet, [&b], |_| true).unwrap(),
    );
    let mut checked = 0;
    for (key, p) in &r2 {
        for (name, t) in p {
            if name.ends_with("running_mean") || name.ends_with("running_var") {
                let mean = ((&ra[key][name] + &rb[key][name]).unwrap() * 0.5).unwrap();
                let d = rel_l2(t, &mean);
                assert!(d < 1e-5, "{key:?} {name}: {d}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 2 * 5, "BN tensors checked: {checked}");
    // Folded weights carry no statistics; no batches, nothing to estimate.
    let mut folded = sn.clone();
    folded.fold().unwrap();
    match folded.recalibrate_bn(&subnet, [&a], |_| true) {
        Err(CoreError::InvalidConfig { field, reason }) => {
            assert_eq!(field, "params");
            assert!(reason.contains("folded"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    match sn.recalibrate_bn(&subnet, std::iter::empty::<&Tensor>(), |_| true) {
        Err(CoreError::InvalidConfig { field, .. }) => assert_eq!(field, "batches"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn cost_range_matches_brute_force() {
    let spec = supernet_spec(&resnet20().spec, &all_branches());
    let (mut pmin, mut pmax, mut mmin, mut mmax) = (u64::MAX, 0, u64::MAX, 0);
    for s in spec.enumerate(1_000_000).unwrap() {
        let m = spec.subnet_spec(&s).unwrap();
        let (p, c) = (m.num_params(), m.macs());
        (pmin, pmax, mmin, mmax) = (pmin.min(p), pmax.max(p), mmin.min(c), mmax.max(c));
    }
    assert_eq!(spec.cost_range(), ((pmin, pmax), (mmin, mmax)));
    // The all-original subnet is the oracle, so the range spans its cost.
    let o = &resnet20().spec;
    assert!(pmin < o.num_params() && o.num_params() <= pmax);
    assert!(mmin < o.macs() && o.macs() <= mmax);
}
