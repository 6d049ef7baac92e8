//! Architecture descriptors (JSON) and the families they name, lowered to a [`ModelSpec`] plus
//! the mapping from the family's own tensor names to canonical (module, local name) pairs.
//!
//! Families:
//! - `torchvision.resnet`: torchvision ResNet (`block` basic|bottleneck, `layers`,
//!   `width_per_group`, `num_classes`), 7x7/2 stem + 3x3/2 max-pool.
//! - `adaptivenet.resnet_small`: CIFAR-style ResNet for 28-32 px inputs: 3x3/1 stem, no max-pool,
//!   any `widths`/`layers`, `in_channels`, 1x1 conv+BN projection shortcuts; torchvision key names.
//! - `torchvision.mobilenet_v2`: torchvision MobileNetV2 (`width_mult`, `num_classes`).
//! - `efficientnet_lite`: EfficientNet-Lite0 with the `_blocks.N._expand_conv` key scheme.
//! - `adaptivenet.chain`: an explicit [`ModelSpec`] under `spec`, canonical key names (what an
//!   exported subnet is written as).
use serde_json::Value;

use super::spec::{Act, BlockSpec, HeadSpec, ModelSpec, Numerics, Padding, StemSpec};
use crate::{CoreError, Result};

/// Which module of a chain model a tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    Stem,
    Block(usize),
    Head,
}

/// A parsed architecture descriptor: the family's spec and how its key names map.
#[derive(Clone, Debug)]
pub struct ArchDescriptor {
    /// The JSON as given (kept so that it can be stored next to the weights).
    pub raw: Value,
    pub spec: ModelSpec,
    /// Family key prefix → (slot, canonical prefix); see [`ArchDescriptor::canonical_name`].
    key_map: KeyMap,
}

#[derive(Clone, Debug)]
enum KeyMap {
    TorchvisionResnet { stage_sizes: Vec<usize> },
    MobileNetV2 { expand: Vec<bool> },
    EfficientNetLite { expand: Vec<bool> },
    Canonical,
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value> {
    v.get(name).ok_or_else(|| CoreError::InvalidArch {
        field: name.into(),
        reason: "missing".into(),
    })
}

fn usize_field(v: &Value, name: &str) -> Result<usize> {
    field(v, name)?
        .as_u64()
        .filter(|&n| n > 0 && n < 1 << 20)
        .map(|n| n as usize)
        .ok_or_else(|| CoreError::InvalidArch {
            field: name.into(),
            reason: "must be a positive integer".into(),
        })
}

fn usize_or(v: &Value, name: &str, default: usize) -> Result<usize> {
    if v.get(name).is_some() {
        usize_field(v, name)
    } else {
        Ok(default)
    }
}

fn usize_list(v: &Value, name: &str) -> Result<Vec<usize>> {
    let bad = || CoreError::InvalidArch {
        field: name.into(),
        reason: "must be a non-empty list of positive integers".into(),
    };
    let arr = field(v, name)?.as_array().ok_or_else(bad)?;
    if arr.is_empty() || arr.len() > 64 {
        return Err(bad());
    }
    arr.iter()
        .map(|x| {
            x.as_u64()
                .filter(|&n| n > 0 && n < 1 << 16)
                .map(|n| n as usize)
                .ok_or_else(bad)
        })
        .collect()
}

/// torchvision's `_make_divisible`.
fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new_v = (divisor as i64).max(((v + d / 2.0) as i64) / divisor as i64 * divisor as i64);
    if (new_v as f64) < 0.9 * v {
        new_v += divisor as i64;
    }
    new_v as usize
}

const RESNET: Numerics = Numerics {
    bn_eps: 1e-5,
    padding: Padding::Symmetric,
    act: Act::Relu,
};

impl ArchDescriptor {
    /// Parses a descriptor; unknown keys (e.g. `input`, `dtype`) are ignored.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let raw: Value = serde_json::from_slice(bytes)?;
        Self::from_value(raw)
    }

    /// Parses an already decoded descriptor.
    pub fn from_value(raw: Value) -> Result<Self> {
        if !raw.is_object() {
            return Err(CoreError::InvalidArch {
                field: "<root>".into(),
                reason: "descriptor must be a JSON object".into(),
            });
        }
        let family = field(&raw, "family")?
            .as_str()
            .ok_or_else(|| CoreError::InvalidArch {
                field: "family".into(),
                reason: "must be a string".into(),
            })?
            .to_string();
        let (spec, key_map) = match family.as_str() {
            "torchvision.resnet" => resnet(&raw, false)?,
            "adaptivenet.resnet_small" => resnet(&raw, true)?,
            "torchvision.mobilenet_v2" => mobilenet_v2(&raw)?,
            "efficientnet_lite" => efficientnet_lite(&raw)?,
            "adaptivenet.chain" => {
                let spec: ModelSpec = serde_json::from_value(field(&raw, "spec")?.clone())
                    .map_err(|e| CoreError::InvalidArch {
                        field: "spec".into(),
                        reason: e.to_string(),
                    })?;
                validate_chain(&spec)?;
                (spec, KeyMap::Canonical)
            }
            _ => return Err(CoreError::UnknownFamily(family)),
        };
        Ok(Self { raw, spec, key_map })
    }

    /// A descriptor for an explicit chain spec (exported subnets, supernet oracles).
    pub fn chain(spec: ModelSpec) -> Self {
        let raw = serde_json::json!({ "family": "adaptivenet.chain", "spec": spec });
        Self {
            raw,
            spec,
            key_map: KeyMap::Canonical,
        }
    }

    /// Maps a family tensor name to (slot, canonical local name); `None` if the name is not
    /// part of this architecture.
    pub fn canonical_name(&self, key: &str) -> Option<(Slot, String)> {
        match &self.key_map {
            KeyMap::Canonical => canonical(key),
            KeyMap::TorchvisionResnet { stage_sizes } => {
                if let Some(rest) = key.strip_prefix("conv1.") {
                    return Some((Slot::Stem, format!("conv.{rest}")));
                }
                if let Some(rest) = key.strip_prefix("bn1.") {
                    return Some((Slot::Stem, format!("bn.{rest}")));
                }
                if key.starts_with("fc.") {
                    return Some((Slot::Head, key.to_string()));
                }
                let rest = key.strip_prefix("layer")?;
                let (stage, rest) = rest.split_once('.')?;
                let (idx, local) = rest.split_once('.')?;
                let stage: usize = stage.parse().ok()?;
                let idx: usize = idx.parse().ok()?;
                if stage == 0 || stage > stage_sizes.len() || idx >= stage_sizes[stage - 1] {
                    return None;
                }
                let block = stage_sizes[..stage - 1].iter().sum::<usize>() + idx;
                Some((Slot::Block(block), local.to_string()))
            }
            KeyMap::MobileNetV2 { expand } => {
                if let Some(rest) = key.strip_prefix("classifier.1.") {
                    return Some((Slot::Head, format!("fc.{rest}")));
                }
                let rest = key.strip_prefix("features.")?;
                let (i, local) = rest.split_once('.')?;
                let i: usize = i.parse().ok()?;
                let n = expand.len();
                if i == 0 {
                    return Some((Slot::Stem, sequential_conv_bn(local, "conv", "bn")?));
                }
                if i == n + 1 {
                    return Some((Slot::Head, sequential_conv_bn(local, "conv", "bn")?));
                }
                if i > n + 1 {
                    return None;
                }
                let b = i - 1;
                let local = local.strip_prefix("conv.")?;
                let mapped = if expand[b] {
                    map_prefix(
                        local,
                        &[
                            ("0.0.", "expand.conv."),
                            ("0.1.", "expand.bn."),
                            ("1.0.", "dw.conv."),
                            ("1.1.", "dw.bn."),
                            ("2.", "project.conv."),
                            ("3.", "project.bn."),
                        ],
                    )?
                } else {
                    map_prefix(
                        local,
                        &[
                            ("0.0.", "dw.conv."),
                            ("0.1.", "dw.bn."),
                            ("1.", "project.conv."),
                            ("2.", "project.bn."),
                        ],
                    )?
                };
                Some((Slot::Block(b), mapped))
            }
            KeyMap::EfficientNetLite { expand } => {
                if let Some(rest) = key.strip_prefix("_conv_stem.") {
                    return Some((Slot::Stem, format!("conv.{rest}")));
                }
                if let Some(rest) = key.strip_prefix("_bn0.") {
                    return Some((Slot::Stem, format!("bn.{rest}")));
                }
                if let Some(rest) = key.strip_prefix("_conv_head.") {
                    return Some((Slot::Head, format!("conv.{rest}")));
                }
                if let Some(rest) = key.strip_prefix("_bn1.") {
                    return Some((Slot::Head, format!("bn.{rest}")));
                }
                if let Some(rest) = key.strip_prefix("_fc.") {
                    return Some((Slot::Head, format!("fc.{rest}")));
                }
                let rest = key.strip_prefix("_blocks.")?;
                let (i, local) = rest.split_once('.')?;
                let b: usize = i.parse().ok()?;
                if b >= expand.len() {
                    return None;
                }
                let mapped = map_prefix(
                    local,
                    &[
                        ("_expand_conv.", "expand.conv."),
                        ("_bn0.", "expand.bn."),
                        ("_depthwise_conv.", "dw.conv."),
                        ("_bn1.", "dw.bn."),
                        ("_project_conv.", "project.conv."),
                        ("_bn2.", "project.bn."),
                    ],
                )?;
                Some((Slot::Block(b), mapped))
            }
        }
    }
}

/// Canonical global names: `stem.X`, `blocks.N.X`, `head.X`.
pub fn canonical(key: &str) -> Option<(Slot, String)> {
    if let Some(rest) = key.strip_prefix("stem.") {
        return Some((Slot::Stem, rest.to_string()));
    }
    if let Some(rest) = key.strip_prefix("head.") {
        return Some((Slot::Head, rest.to_string()));
    }
    let rest = key.strip_prefix("blocks.")?;
    let (i, local) = rest.split_once('.')?;
    Some((Slot::Block(i.parse().ok()?), local.to_string()))
}

/// The canonical global name of a (slot, local) pair.
pub fn global_name(slot: Slot, local: &str) -> String {
    match slot {
        Slot::Stem => format!("stem.{local}"),
        Slot::Block(i) => format!("blocks.{i}.{local}"),
        Slot::Head => format!("head.{local}"),
    }
}

fn map_prefix(local: &str, table: &[(&str, &str)]) -> Option<String> {
    table
        .iter()
        .find_map(|(from, to)| local.strip_prefix(from).map(|r| format!("{to}{r}")))
}

/// `0.weight` → `{conv}.weight`, `1.X` → `{bn}.X` (torchvision's Conv2dNormActivation).
fn sequential_conv_bn(local: &str, conv: &str, bn: &str) -> Option<String> {
    map_prefix(
        local,
        &[("0.", &format!("{conv}.")), ("1.", &format!("{bn}."))],
    )
}

fn resnet(raw: &Value, small: bool) -> Result<(ModelSpec, KeyMap)> {
    let block = field(raw, "block")?.as_str().unwrap_or("");
    let bottleneck = match block {
        "basic" => false,
        "bottleneck" => true,
        _ => {
            return Err(CoreError::InvalidArch {
                field: "block".into(),
                reason: format!("must be \"basic\" or \"bottleneck\", got {block:?}"),
            })
        }
    };
    let layers = usize_list(raw, "layers")?;
    let classes = usize_or(raw, "num_classes", 1000)?;
    let expansion = if bottleneck { 4 } else { 1 };
    let (stem, widths) = if small {
        let widths = usize_list(raw, "widths")?;
        if widths.len() != layers.len() {
            return Err(CoreError::InvalidArch {
                field: "widths".into(),
                reason: format!(
                    "has {} entries but layers has {}",
                    widths.len(),
                    layers.len()
                ),
            });
        }
        let stem = StemSpec {
            cin: usize_or(raw, "in_channels", 3)?,
            cout: usize_or(raw, "stem_width", widths[0])?,
            kernel: 3,
            stride: 1,
            maxpool: false,
        };
        (stem, widths)
    } else {
        if layers.len() != 4 {
            return Err(CoreError::InvalidArch {
                field: "layers".into(),
                reason: "torchvision ResNet has 4 stages".into(),
            });
        }
        if raw.get("groups").and_then(Value::as_u64).unwrap_or(1) != 1 {
            return Err(CoreError::InvalidArch {
                field: "groups".into(),
                reason: "grouped ResNeXt convolutions are not supported".into(),
            });
        }
        let stem = StemSpec {
            cin: usize_or(raw, "in_channels", 3)?,
            cout: 64,
            kernel: 7,
            stride: 2,
            maxpool: true,
        };
        (stem, vec![64, 128, 256, 512])
    };
    let width_per_group = usize_or(raw, "width_per_group", 64)?;
    let mut blocks = Vec::new();
    let mut cin = stem.cout;
    for (s, (&n, &planes)) in layers.iter().zip(&widths).enumerate() {
        for j in 0..n {
            let stride = if s > 0 && j == 0 { 2 } else { 1 };
            let cout = planes * expansion;
            let proj = BlockSpec::needs_proj(cin, cout, stride);
            let b = if bottleneck {
                let mid = if small {
                    planes
                } else {
                    planes * width_per_group / 64
                };
                BlockSpec::Bottleneck {
                    cin,
                    mid,
                    cout,
                    stride,
                    proj,
                }
            } else {
                BlockSpec::Basic {
                    cin,
                    mid: planes,
                    cout,
                    stride,
                    proj,
                }
            };
            blocks.push(b);
            cin = cout;
        }
    }
    let input = if small {
        [stem.cin, 28, 28]
    } else {
        [stem.cin, 224, 224]
    };
    let family = if small {
        "adaptivenet.resnet_small"
    } else {
        "torchvision.resnet"
    };
    let spec = ModelSpec {
        family: family.into(),
        numerics: RESNET,
        input,
        stem,
        blocks,
        head: HeadSpec {
            cin,
            conv: None,
            classes,
        },
    };
    Ok((
        spec,
        KeyMap::TorchvisionResnet {
            stage_sizes: layers,
        },
    ))
}

fn mobilenet_v2(raw: &Value) -> Result<(ModelSpec, KeyMap)> {
    let wm = match raw.get("width_mult") {
        None => 1.0,
        Some(v) => v
            .as_f64()
            .filter(|w| *w > 0.0 && *w <= 4.0)
            .ok_or_else(|| CoreError::InvalidArch {
                field: "width_mult".into(),
                reason: "must be a number in (0, 4]".into(),
            })?,
    };
    let classes = usize_or(raw, "num_classes", 1000)?;
    let settings = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ];
    let stem_c = make_divisible(32.0 * wm, 8);
    let last = make_divisible(1280.0 * wm.max(1.0), 8);
    let mut cin = stem_c;
    let mut blocks = Vec::new();
    let mut expand = Vec::new();
    for (t, c, n, s) in settings {
        let cout = make_divisible(c as f64 * wm, 8);
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            let hidden = (cin as f64 * t as f64).round() as usize;
            blocks.push(BlockSpec::MbConv {
                cin,
                hidden,
                cout,
                kernel: 3,
                stride,
                expand: t != 1,
                residual: stride == 1 && cin == cout,
            });
            expand.push(t != 1);
            cin = cout;
        }
    }
    let spec = ModelSpec {
        family: "torchvision.mobilenet_v2".into(),
        numerics: Numerics {
            bn_eps: 1e-5,
            padding: Padding::Symmetric,
            act: Act::Relu6,
        },
        input: [3, 224, 224],
        stem: StemSpec {
            cin: 3,
            cout: stem_c,
            kernel: 3,
            stride: 2,
            maxpool: false,
        },
        blocks,
        head: HeadSpec {
            cin,
            conv: Some(last),
            classes,
        },
    };
    Ok((spec, KeyMap::MobileNetV2 { expand }))
}

fn efficientnet_lite(raw: &Value) -> Result<(ModelSpec, KeyMap)> {
    let variant = raw
        .get("variant")
        .and_then(Value::as_str)
        .unwrap_or("lite0");
    if variant != "lite0" {
        return Err(CoreError::InvalidArch {
            field: "variant".into(),
            reason: format!("only \"lite0\" is supported, got {variant:?}"),
        });
    }
    let classes = usize_or(raw, "num_classes", 1000)?;
    // (repeats, kernel, first stride, expand ratio, out channels)
    let stages = [
        (1, 3, 1, 1, 16),
        (2, 3, 2, 6, 24),
        (2, 5, 2, 6, 40),
        (3, 3, 2, 6, 80),
        (3, 5, 1, 6, 112),
        (4, 5, 2, 6, 192),
        (1, 3, 1, 6, 320),
    ];
    let mut cin = 32;
    let mut blocks = Vec::new();
    let mut expand = Vec::new();
    for (n, k, s, e, cout) in stages {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            blocks.push(BlockSpec::MbConv {
                cin,
                hidden: cin * e,
                cout,
                kernel: k,
                stride,
                expand: e != 1,
                residual: stride == 1 && cin == cout,
            });
            expand.push(e != 1);
            cin = cout;
        }
    }
    let spec = ModelSpec {
        family: "efficientnet_lite".into(),
        numerics: Numerics {
            bn_eps: 1e-3,
            padding: Padding::TfSame,
            act: Act::Relu6,
        },
        input: [3, 224, 224],
        stem: StemSpec {
            cin: 3,
            cout: 32,
            kernel: 3,
            stride: 2,
            maxpool: false,
        },
        blocks,
        head: HeadSpec {
            cin,
            conv: Some(1280),
            classes,
        },
    };
    Ok((spec, KeyMap::EfficientNetLite { expand }))
}

/// Checks that consecutive modules of an explicit chain agree on channels.
fn validate_chain(spec: &ModelSpec) -> Result<()> {
    let mut c = spec.stem.cout;
    if spec.stem.cin != spec.input[0] {
        return Err(CoreError::InvalidArch {
            field: "spec.stem.cin".into(),
            reason: format!("{} != input channels {}", spec.stem.cin, spec.input[0]),
        });
    }
    for (i, b) in spec.blocks.iter().enumerate() {
        if b.cin() != c {
            return Err(CoreError::InvalidArch {
                field: format!("spec.blocks[{i}].cin"),
                reason: format!("{} != previous output channels {c}", b.cin()),
            });
        }
        if b.stride() == 0 || b.stride() > 4 {
            return Err(CoreError::InvalidArch {
                field: format!("spec.blocks[{i}].stride"),
                reason: "must be 1..=4".into(),
            });
        }
        c = b.cout();
    }
    if spec.head.cin != c {
        return Err(CoreError::InvalidArch {
            field: "spec.head.cin".into(),
            reason: format!("{} != last block output channels {c}", spec.head.cin),
        });
    }
    Ok(())
}

/// BN tensor names a torchvision state dict also carries but we never use.
pub(crate) fn is_ignored_key(key: &str) -> bool {
    key.ends_with("num_batches_tracked")
}
