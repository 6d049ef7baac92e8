//! Eval-time BatchNorm folding: every conv/BN pair becomes one conv with a bias, so inference
//! runs one fused conv + bias + activation kernel per layer instead of three passes.
//!
//! Folded [`Params`] drop the BN tensors and gain `{conv}.bias` (and, for 1x1 convs, the
//! GEMM-packed weight `{conv}.packed`, see [`packed_name`]); the forward functions notice
//! the missing BN and take the fused path, so folded and unfolded modules share one forward
//! implementation (and the folded oracle equals the folded all-original subnet bit for bit).
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

/// Name of the pre-packed form of a folded 1x1 conv's weight (`{conv}.packed`): packed once
/// here, when a module is installed for inference, so the pointwise GEMM never packs per call.
pub fn packed_name(conv: &str) -> String {
    format!("{conv}.packed")
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
        if let [_, _, 1, 1] = wf.dims() {
            out.insert(
                packed_name(&conv),
                adaptivenet_kernels::pack_pointwise(&wf)?,
            );
        }
        out.insert(w_name, wf);
        out.insert(format!("{conv}.bias"), bf);
        for part in super::spec::BN_PARTS {
            out.remove(&format!("{bn}.{part}"));
        }
    }
    Ok(out)
}
