//! Eval-time BatchNorm folding: every conv/BN pair becomes one conv with a bias, so inference
//! runs one fused conv + bias + activation kernel per layer instead of three passes.
//!
//! Folded [`Params`] drop the BN tensors and gain `{conv}.bias` and the micro-kernel-packed
//! weight `{conv}.packed` (see [`packed_name`]; a head's classifier gets `fc.packed`); the forward functions notice the missing BN
//! and take the fused path (a 1x1 conv the pointwise GEMM, a stride-1 3x3 one Winograd
//! F(4x4, 3x3) or F(2x2, 3x3) where it wins (`{conv}.wino4` / `{conv}.wino`, see
//! [`winograd4_name`], [`winograd_name`]), any other one-group conv
//! the direct conv, all with bias, activation and residual add in the epilogue), so folded and
//! unfolded modules share one forward implementation (and the folded oracle equals the
//! folded all-original subnet bit for bit).
use super::Params;
use crate::Result;

/// The conv that a BN prefix normalises (`bn1`→`conv1`, `dw.bn`→`dw.conv`,
/// `downsample.1`→`downsample.0`, `bn`→`conv`).
pub fn conv_of_bn(bn: &str) -> Option<String> {
    if bn == "bn" {
        return Some("conv".into());
    }
    if let Some(p) = bn.strip_suffix(".bn") {
        return Some(format!("{p}.conv"));
    }
    if let Some(p) = bn.strip_suffix(".1") {
        return Some(format!("{p}.0"));
    }
    bn.strip_prefix("bn").map(|n| format!("conv{n}"))
}

/// Name of the pre-packed form of a folded conv's weight (`{conv}.packed`, see
/// [`adaptivenet_kernels::pack_conv`]): packed once here, when a module is installed for
/// inference, so no conv packs or builds an im2col matrix per call. Depthwise weights
/// (`[C, 1, K, K]`) fall below [`MIN_PACKED_REDUCTION`] and are not packed.
pub fn packed_name(conv: &str) -> String {
    format!("{conv}.packed")
}

/// Name of the Winograd F(2x2, 3x3) form of a folded 3x3 conv's weight (`{conv}.wino`, see
/// [`adaptivenet_kernels::pack_winograd`]), packed here beside `{conv}.packed` when the
/// conv's channel counts are ones where Winograd beats the direct conv
/// ([`adaptivenet_kernels::winograd_channels`]). The stride is not known here (a module's
/// params do not record it) and neither is the map size, so both forms are kept (the
/// Winograd one is 16/9 of the weight): the forward takes the Winograd one for a stride-1
/// call where [`adaptivenet_kernels::winograd_wins`] (batch, channels, map), the direct one
/// otherwise.
pub fn winograd_name(conv: &str) -> String {
    format!("{conv}.wino")
}

/// Name of the Winograd F(4x4, 3x3) form (`{conv}.wino4`, see
/// [`adaptivenet_kernels::pack_winograd_tile`]), packed beside the others where
/// [`adaptivenet_kernels::winograd4_channels`] (36/9 of the weight); the forward takes it
/// where [`adaptivenet_kernels::winograd_tile`] picks tile 4.
pub fn winograd4_name(conv: &str) -> String {
    format!("{conv}.wino4")
}

/// The Winograd forms (tile sides) a folded conv weight `[O, C, KH, KW]` gets too.
fn winograd_packs(w: &candle_core::Tensor) -> Result<Vec<usize>> {
    let (o, c, kh, kw) = w.dims4()?;
    let mut tiles = Vec::new();
    if (kh, kw) == (3, 3) && adaptivenet_kernels::winograd_channels(c, o) {
        tiles.push(2);
    }
    if (kh, kw) == (3, 3) && adaptivenet_kernels::winograd4_channels(c, o) {
        tiles.push(4);
    }
    Ok(tiles)
}

/// Reductions (`C * KH * KW`) below which a KxK conv keeps the im2col + GEMM path: with so
/// few steps per tile the direct conv's per-tile epilogue and per-call scratch outweigh
/// the im2col it saves (measured, `cargo bench --bench packed`: a 3x3 1->16 stem at 28x28
/// ran 0.66x, 4->16 0.94x, 16->16 1.18x). The RGB stems of MobileNetV2 and EfficientNet
/// (3x3, 3->32, stride 2 at 224: reduction 27) are on the packed side: there the im2col
/// path (im2col, a zeroed output, the GEMM) cost ~10 % of a Lite0 forward, for 3 % of its
/// MACs, and the packed conv took ~1.5-2 ms off Lite0 and MobileNetV2 1.0 at 224 (thread
/// CPU time, 1 thread). 1x1 convs always pack (the pointwise GEMM).
const MIN_PACKED_REDUCTION: usize = 27;

/// Whether a folded conv weight `[O, C, KH, KW]` gets a packed form.
fn packs(w: &candle_core::Tensor) -> Result<bool> {
    let (_, c, kh, kw) = w.dims4()?;
    Ok(kh * kw == 1 || c * kh * kw >= MIN_PACKED_REDUCTION)
}

/// Whether a module's params are already folded (no BN statistics left).
pub fn is_folded(p: &Params) -> bool {
    !p.keys().any(|k| k.ends_with("running_mean"))
}

/// Folds every conv/BN pair of a module (`eps` is the family's BN epsilon).
pub fn fold_params(p: &Params, eps: f64) -> Result<Params> {
    let mut out = p.clone();
    let bns: Vec<String> = p
        .keys()
        .filter_map(|k| k.strip_suffix(".running_mean").map(str::to_string))
        .collect();
    for bn in bns {
        let Some(conv) = conv_of_bn(&bn) else {
            continue;
        };
        let w_name = format!("{conv}.weight");
        let (Some(w), Some(g), Some(b), Some(m), Some(v)) = (
            p.get(&w_name),
            p.get(&format!("{bn}.weight")),
            p.get(&format!("{bn}.bias")),
            p.get(&format!("{bn}.running_mean")),
            p.get(&format!("{bn}.running_var")),
        ) else {
            continue;
        };
        let (wf, bf) = adaptivenet_kernels::fold_bn(w, None, g, b, m, v, eps)?;
        if packs(&wf)? {
            out.insert(packed_name(&conv), adaptivenet_kernels::pack_conv(&wf)?);
            for tile in winograd_packs(&wf)? {
                let u = adaptivenet_kernels::pack_winograd_tile(&wf, tile)?;
                let name = if tile == 4 {
                    winograd4_name(&conv)
                } else {
                    winograd_name(&conv)
                };
                out.insert(name, u);
            }
        }
        out.insert(w_name, wf);
        out.insert(format!("{conv}.bias"), bf);
        for part in super::spec::BN_PARTS {
            out.remove(&format!("{bn}.{part}"));
        }
    }
    // The classifier (`fc`, `[classes, features]`) runs as a packed 1x1 GEMM on the pooled
    // features too: on one pixel per image its vectors run over the classes.
    if let (Some(w), true) = (p.get("fc.weight"), p.contains_key("fc.bias")) {
        out.insert(packed_name("fc"), adaptivenet_kernels::pack_pointwise(w)?);
    }
    Ok(out)
}
