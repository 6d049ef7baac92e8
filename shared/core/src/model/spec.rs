//! Architecture specs: the family-independent description of a chain model (stem, blocks, head).
//!
//! A spec says which tensors a module owns (canonical local names and shapes), what shape it
//! maps its input to, and what it costs. Weights live elsewhere ([`super::Params`]); keeping the
//! spec plain data makes it serialisable into manifests and descriptors of exported subnets.
use serde::{Deserialize, Serialize};

/// Activation after a conv/BN pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    Relu,
    Relu6,
}

/// How a conv pads its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// PyTorch-style `k / 2` on every side.
    Symmetric,
    /// TensorFlow "SAME": total `max((ceil(i/s)-1)*s + k - i, 0)`, half before, rest after.
    TfSame,
}

/// Model-wide numerics that every conv/BN/activation of a family shares.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Numerics {
    pub bn_eps: f64,
    pub padding: Padding,
    pub act: Act,
}

impl Numerics {
    /// Per-side padding (top, bottom, left, right) of a `k`x`k` conv with stride `s` on `h`x`w`.
    pub fn pad(&self, h: usize, w: usize, k: usize, s: usize) -> (usize, usize, usize, usize) {
        match self.padding {
            Padding::Symmetric => (k / 2, k / 2, k / 2, k / 2),
            Padding::TfSame => {
                let total = |i: usize| {
                    let out = i.div_ceil(s);
                    ((out.saturating_sub(1)) * s + k).saturating_sub(i)
                };
                let (th, tw) = (total(h), total(w));
                (th / 2, th - th / 2, tw / 2, tw - tw / 2)
            }
        }
    }

    /// Output side length of a conv.
    pub fn out_size(&self, i: usize, k: usize, s: usize) -> usize {
        match self.padding {
            Padding::Symmetric => (i + 2 * (k / 2) - k) / s + 1,
            Padding::TfSame => i.div_ceil(s),
        }
    }
}

/// The non-elastic stem: conv + BN + activation, optionally followed by a 3x3/2 max-pool
/// with padding 1 (torchvision ResNet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StemSpec {
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub maxpool: bool,
}

/// The non-elastic head: optional 1x1 conv + BN + activation, global average pool, linear.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadSpec {
    pub cin: usize,
    /// Width of the 1x1 conv before pooling (MobileNetV2 / EfficientNet), if any.
    pub conv: Option<usize>,
    pub classes: usize,
}

/// One residual unit of the chain. Every field that changes a tensor shape is explicit, so a
/// merged or pruned branch is just another `BlockSpec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockSpec {
    /// ResNet BasicBlock: 3x3 (stride) → 3x3, shortcut identity or 1x1 projection.
    Basic {
        cin: usize,
        mid: usize,
        cout: usize,
        stride: usize,
        proj: bool,
    },
    /// ResNet Bottleneck: 1x1 → 3x3 (stride, torchvision convention) → 1x1.
    Bottleneck {
        cin: usize,
        mid: usize,
        cout: usize,
        stride: usize,
        proj: bool,
    },
    /// Inverted residual: [1x1 expand] → kxk depthwise (stride) → 1x1 project (no activation).
    MbConv {
        cin: usize,
        hidden: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        expand: bool,
        residual: bool,
    },
}

/// Canonical BN tensor names under a prefix.
pub(crate) const BN_PARTS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

fn push_conv(out: &mut Vec<(String, Vec<usize>)>, name: &str, shape: [usize; 4]) {
    out.push((format!("{name}.weight"), shape.to_vec()));
}

fn push_bn(out: &mut Vec<(String, Vec<usize>)>, name: &str, c: usize) {
    for p in BN_PARTS {
        out.push((format!("{name}.{p}"), vec![c]));
    }
}

/// Whether a tensor name is BN running statistics (state, not a trainable parameter).
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

impl BlockSpec {
    pub fn cin(&self) -> usize {
        match *self {
            BlockSpec::Basic { cin, .. }
            | BlockSpec::Bottleneck { cin, .. }
            | BlockSpec::MbConv { cin, .. } => cin,
        }
    }

    pub fn cout(&self) -> usize {
        match *self {
            BlockSpec::Basic { cout, .. }
            | BlockSpec::Bottleneck { cout, .. }
            | BlockSpec::MbConv { cout, .. } => cout,
        }
    }

    pub fn stride(&self) -> usize {
        match *self {
            BlockSpec::Basic { stride, .. }
            | BlockSpec::Bottleneck { stride, .. }
            | BlockSpec::MbConv { stride, .. } => stride,
        }
    }

    /// The channels that width pruning removes (inner / expanded channels).
    pub fn inner(&self) -> usize {
        match *self {
            BlockSpec::Basic { mid, .. } | BlockSpec::Bottleneck { mid, .. } => mid,
            BlockSpec::MbConv { hidden, .. } => hidden,
        }
    }

    pub fn is_mbconv(&self) -> bool {
        matches!(self, BlockSpec::MbConv { .. })
    }

    /// Whether the block needs a projection shortcut for its shapes (ResNet rule).
    pub fn needs_proj(cin: usize, cout: usize, stride: usize) -> bool {
        stride != 1 || cin != cout
    }

    /// Every tensor the block owns, canonical local name and shape, in a stable order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        match *self {
            BlockSpec::Basic {
                cin,
                mid,
                cout,
                proj,
                ..
            } => {
                push_conv(&mut v, "conv1", [mid, cin, 3, 3]);
                push_bn(&mut v, "bn1", mid);
                push_conv(&mut v, "conv2", [cout, mid, 3, 3]);
                push_bn(&mut v, "bn2", cout);
                if proj {
                    push_conv(&mut v, "downsample.0", [cout, cin, 1, 1]);
                    push_bn(&mut v, "downsample.1", cout);
                }
            }
            BlockSpec::Bottleneck {
                cin,
                mid,
                cout,
                proj,
                ..
            } => {
                push_conv(&mut v, "conv1", [mid, cin, 1, 1]);
                push_bn(&mut v, "bn1", mid);
                push_conv(&mut v, "conv2", [mid, mid, 3, 3]);
                push_bn(&mut v, "bn2", mid);
                push_conv(&mut v, "conv3", [cout, mid, 1, 1]);
                push_bn(&mut v, "bn3", cout);
                if proj {
                    push_conv(&mut v, "downsample.0", [cout, cin, 1, 1]);
                    push_bn(&mut v, "downsample.1", cout);
                }
            }
            BlockSpec::MbConv {
                cin,
                hidden,
                cout,
                kernel,
                expand,
                ..
            } => {
                if expand {
                    push_conv(&mut v, "expand.conv", [hidden, cin, 1, 1]);
                    push_bn(&mut v, "expand.bn", hidden);
                }
                push_conv(&mut v, "dw.conv", [hidden, 1, kernel, kernel]);
                push_bn(&mut v, "dw.bn", hidden);
                push_conv(&mut v, "project.conv", [cout, hidden, 1, 1]);
                push_bn(&mut v, "project.bn", cout);
            }
        }
        v
    }

    /// Output (h, w) for an input of (h, w).
    pub fn out_hw(&self, num: &Numerics, h: usize, w: usize) -> (usize, usize) {
        let (k, s) = match *self {
            BlockSpec::Basic { stride, .. } | BlockSpec::Bottleneck { stride, .. } => (3, stride),
            BlockSpec::MbConv { kernel, stride, .. } => (kernel, stride),
        };
        (num.out_size(h, k, s), num.out_size(w, k, s))
    }

    /// Multiply-accumulates of one forward pass at batch 1 on an (h, w) input (convs only).
    pub fn macs(&self, num: &Numerics, h: usize, w: usize) -> u64 {
        let (oh, ow) = self.out_hw(num, h, w);
        let (hw_in, hw_out) = ((h * w) as u64, (oh * ow) as u64);
        let m = |a: usize, b: usize, c: usize, hw: u64| (a * b * c) as u64 * hw;
        match *self {
            BlockSpec::Basic {
                cin,
                mid,
                cout,
                proj,
                ..
            } => {
                m(mid, cin, 9, hw_out)
                    + m(cout, mid, 9, hw_out)
                    + if proj { m(cout, cin, 1, hw_out) } else { 0 }
            }
            BlockSpec::Bottleneck {
                cin,
                mid,
                cout,
                proj,
                ..
            } => {
                m(mid, cin, 1, hw_in)
                    + m(mid, mid, 9, hw_out)
                    + m(cout, mid, 1, hw_out)
                    + if proj { m(cout, cin, 1, hw_out) } else { 0 }
            }
            BlockSpec::MbConv {
                cin,
                hidden,
                cout,
                kernel,
                expand,
                ..
            } => {
                (if expand { m(hidden, cin, 1, hw_in) } else { 0 })
                    + m(hidden, 1, kernel * kernel, hw_out)
                    + m(cout, hidden, 1, hw_out)
            }
        }
    }
}

impl StemSpec {
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        push_conv(
            &mut v,
            "conv",
            [self.cout, self.cin, self.kernel, self.kernel],
        );
        push_bn(&mut v, "bn", self.cout);
        v
    }

    pub fn out_hw(&self, num: &Numerics, h: usize, w: usize) -> (usize, usize) {
        let (mut oh, mut ow) = (
            num.out_size(h, self.kernel, self.stride),
            num.out_size(w, self.kernel, self.stride),
        );
        if self.maxpool {
            oh = (oh + 2 - 3) / 2 + 1;
            ow = (ow + 2 - 3) / 2 + 1;
        }
        (oh, ow)
    }

    pub fn macs(&self, num: &Numerics, h: usize, w: usize) -> u64 {
        let (oh, ow) = (
            num.out_size(h, self.kernel, self.stride),
            num.out_size(w, self.kernel, self.stride),
        );
        (self.cout * self.cin * self.kernel * self.kernel * oh * ow) as u64
    }
}

impl HeadSpec {
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        let feat = match self.conv {
            Some(c) => {
                push_conv(&mut v, "conv", [c, self.cin, 1, 1]);
                push_bn(&mut v, "bn", c);
                c
            }
            None => self.cin,
        };
        v.push(("fc.weight".into(), vec![self.classes, feat]));
        v.push(("fc.bias".into(), vec![self.classes]));
        v
    }

    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let feat = self.conv.unwrap_or(self.cin);
        let conv = self.conv.map_or(0, |c| c * self.cin * h * w);
        (conv + feat * self.classes) as u64
    }
}

/// Counts trainable parameters (running statistics excluded) of a list of shapes.
pub fn count_params(shapes: &[(String, Vec<usize>)]) -> u64 {
    shapes
        .iter()
        .filter(|(n, _)| !is_running_stat(n))
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum()
}

/// A whole chain model: what every family lowers to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The family it was imported from (informational).
    pub family: String,
    pub numerics: Numerics,
    /// Default input (channels, height, width).
    pub input: [usize; 3],
    pub stem: StemSpec,
    pub blocks: Vec<BlockSpec>,
    pub head: HeadSpec,
}

impl ModelSpec {
    /// (channels, h, w) entering each block, plus the shape after the last block at the end
    /// (so the vector has `blocks.len() + 1` entries).
    pub fn block_shapes(&self, h: usize, w: usize) -> Vec<[usize; 3]> {
        let (mut h, mut w) = self.stem.out_hw(&self.numerics, h, w);
        let mut out = vec![[self.stem.cout, h, w]];
        for b in &self.blocks {
            (h, w) = b.out_hw(&self.numerics, h, w);
            out.push([b.cout(), h, w]);
        }
        out
    }

    /// Trainable parameter count of the whole model.
    pub fn num_params(&self) -> u64 {
        count_params(&self.stem.param_shapes())
            + self
                .blocks
                .iter()
                .map(|b| count_params(&b.param_shapes()))
                .sum::<u64>()
            + count_params(&self.head.param_shapes())
    }

    /// MACs of one batch-1 forward pass at the default input size.
    pub fn macs(&self) -> u64 {
        let [_, h, w] = self.input;
        let shapes = self.block_shapes(h, w);
        let mut total = self.stem.macs(&self.numerics, h, w);
        for (b, s) in self.blocks.iter().zip(&shapes) {
            total += b.macs(&self.numerics, s[1], s[2]);
        }
        let last = shapes.last().expect("block_shapes is never empty");
        total + self.head.macs(last[1], last[2])
    }
}
