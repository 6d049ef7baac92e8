//! Optimizers over `candle_core::Var`s with checkpointable state, and learning-rate schedules.
//!
//! candle's own SGD has no momentum or weight decay, so both optimizers follow PyTorch's
//! update rules exactly (`torch.optim.SGD` with `dampening = 0`, `torch.optim.AdamW`),
//! including per-parameter step counts: a parameter without a gradient in a step (a branch
//! that the sampled path did not use) is skipped entirely, as PyTorch skips `grad is None`.
//!
//! State is a set of named tensors (`momentum_buffer.<param>`, `exp_avg.<param>`,
//! `exp_avg_sq.<param>`) plus per-parameter step counts, serialisable with
//! [`OptimState::to_safetensors`] and restorable bit for bit.
use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

/// The optimizer state: named moment tensors and per-parameter step counts.
#[derive(Clone, Debug, Default)]
pub struct OptimState {
    /// Slot name (`exp_avg.blocks.0.conv1.weight`, ...) → tensor.
    pub slots: BTreeMap<String, Tensor>,
    /// Parameter name → number of updates applied to it.
    pub steps: BTreeMap<String, u64>,
}

impl OptimState {
    /// Serialises the state as safetensors; step counts go into the metadata.
    pub fn to_safetensors(&self) -> candle_core::Result<Vec<u8>> {
        let mut meta = HashMap::new();
        meta.insert(
            "steps".to_string(),
            serde_json::to_string(&self.steps).map_err(candle_core::Error::wrap)?,
        );
        let tensors: Vec<(&str, Tensor)> = self
            .slots
            .iter()
            .map(|(k, v)| Ok((k.as_str(), v.contiguous()?)))
            .collect::<candle_core::Result<_>>()?;
        safetensors::tensor::serialize(tensors.iter().map(|(k, v)| (*k, v)), Some(meta))
            .map_err(candle_core::Error::wrap)
    }

    /// Parses what [`OptimState::to_safetensors`] wrote.
    pub fn from_safetensors(bytes: &[u8]) -> candle_core::Result<Self> {
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(candle_core::Error::wrap)?;
        let steps = match meta.metadata().as_ref().and_then(|m| m.get("steps")) {
            Some(s) => serde_json::from_str(s).map_err(candle_core::Error::wrap)?,
            None => BTreeMap::new(),
        };
        let slots = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?
            .into_iter()
            .collect();
        Ok(Self { slots, steps })
    }
}

/// A first-order optimizer over named variables.
pub trait Optimizer {
    /// Applies one update with learning rate `lr` to every variable that has a gradient.
    fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
    ) -> candle_core::Result<()>;
    /// The current state (cheap: tensors are reference-counted).
    fn state(&self) -> OptimState;
    /// Replaces the state (resume from a checkpoint).
    fn load_state(&mut self, state: OptimState);
}

/// SGD with momentum, optional Nesterov momentum and L2 weight decay (PyTorch semantics,
/// dampening 0): `g = grad + wd * p; b = mu * b + g; d = nesterov ? g + mu * b : b;
/// p -= lr * d`.
#[derive(Clone, Debug)]
pub struct Sgd {
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    state: OptimState,
}

impl Sgd {
    pub fn new(momentum: f64, nesterov: bool, weight_decay: f64) -> Self {
        Self {
            momentum,
            nesterov,
            weight_decay,
            state: OptimState::default(),
        }
    }
}

impl Optimizer for Sgd {
    fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
    ) -> candle_core::Result<()> {
        let hp = adaptivenet_kernels::SgdParams {
            lr,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            nesterov: self.nesterov,
        };
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let key = format!("momentum_buffer.{name}");
            // One in-place kernel per parameter; same arithmetic as the composition below.
            let fused = var.dtype() == DType::F32 && var.as_tensor().is_contiguous();
            if fused {
                let buf = self.state.slots.get(&key);
                if let Some(new) =
                    adaptivenet_kernels::sgd_update(var.as_tensor(), &g.detach(), buf, &hp)?
                {
                    self.state.slots.insert(key, new);
                }
                *self.state.steps.entry(name.clone()).or_insert(0) += 1;
                continue;
            }
            // Detached: state tensors must never hold a backprop graph.
            let p = var.as_detached_tensor();
            let mut g = g.detach();
            if self.weight_decay != 0.0 {
                g = (g + p.affine(self.weight_decay, 0.0)?)?;
            }
            let d = if self.momentum != 0.0 {
                let buf = match self.state.slots.get(&key) {
                    Some(b) => (b.affine(self.momentum, 0.0)? + &g)?,
                    None => g.copy()?,
                };
                let d = if self.nesterov {
                    (&g + buf.affine(self.momentum, 0.0)?)?
                } else {
                    buf.clone()
                };
                self.state.slots.insert(key, buf);
                d
            } else {
                g
            };
            var.set(&(p - d.affine(lr, 0.0)?)?)?;
            *self.state.steps.entry(name.clone()).or_insert(0) += 1;
        }
        Ok(())
    }

    fn state(&self) -> OptimState {
        self.state.clone()
    }

    fn load_state(&mut self, state: OptimState) {
        self.state = state;
    }
}

/// AdamW (decoupled weight decay), PyTorch semantics: `p *= 1 - lr * wd;
/// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
/// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`, with `t` counted per
/// parameter.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    state: OptimState,
}

impl AdamW {
    pub fn new(weight_decay: f64) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            state: OptimState::default(),
        }
    }
}

impl Optimizer for AdamW {
    fn step(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
        lr: f64,
    ) -> candle_core::Result<()> {
        for (name, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            let mut p = var.as_detached_tensor();
            let t = self.state.steps.get(name).copied().unwrap_or(0) + 1;
            if self.weight_decay != 0.0 {
                p = p.affine(1.0 - lr * self.weight_decay, 0.0)?;
            }
            let (mk, vk) = (format!("exp_avg.{name}"), format!("exp_avg_sq.{name}"));
            let zeros = || Tensor::zeros(g.shape(), DType::F32, g.device());
            let m = match self.state.slots.get(&mk) {
                Some(m) => m.clone(),
                None => zeros()?,
            };
            let v = match self.state.slots.get(&vk) {
                Some(v) => v.clone(),
                None => zeros()?,
            };
            let m = (m.affine(self.beta1, 0.0)? + g.affine(1.0 - self.beta1, 0.0)?)?;
            let v = (v.affine(self.beta2, 0.0)? + g.sqr()?.affine(1.0 - self.beta2, 0.0)?)?;
            let bc1 = 1.0 - self.beta1.powi(t as i32);
            let bc2 = 1.0 - self.beta2.powi(t as i32);
            let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), self.eps)?;
            let upd = (&m / denom)?.affine(lr / bc1, 0.0)?;
            var.set(&(p - upd)?)?;
            self.state.slots.insert(mk, m);
            self.state.slots.insert(vk, v);
            self.state.steps.insert(name.clone(), t);
        }
        Ok(())
    }

    fn state(&self) -> OptimState {
        self.state.clone()
    }

    fn load_state(&mut self, state: OptimState) {
        self.state = state;
    }
}

/// Linear warm-up from `base_lr / warmup_steps` to `base_lr`, then cosine decay to `min_lr`
/// at `total_steps`. `lr(step)` is the rate of the update with 0-based index `step`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupCosine {
    pub base_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl WarmupCosine {
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min_lr
            + 0.5 * (self.base_lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(v: &[f32]) -> Var {
        Var::from_slice(v, v.len(), &Device::Cpu).unwrap()
    }

    fn vals(v: &Var) -> Vec<f32> {
        v.as_tensor().to_vec1().unwrap()
    }

    /// Loss = sum(c * p) so that the gradient is exactly `c` at every step.
    fn linear_grads(p: &Var, c: &[f32]) -> GradStore {
        let c = Tensor::from_slice(c, c.len(), &Device::Cpu).unwrap();
        (p.as_tensor() * c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    fn close(a: &[f32], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn sgd_nesterov_weight_decay_matches_hand_computation() {
        let p = var(&[1.0, -2.0]);
        let vars = vec![("w".to_string(), p.clone())];
        let mut opt = Sgd::new(0.9, true, 0.1);
        let c = [0.5f32, 1.0];
        // Step 1: g = c + 0.1 p = [0.6, 0.8]; b = g; d = g + 0.9 b = 1.9 g = [1.14, 1.52];
        // p = p - 0.1 d = [0.886, -2.152].
        opt.step(&vars, &linear_grads(&p, &c), 0.1).unwrap();
        close(&vals(&p), &[0.886, -2.152]);
        // Step 2: g = c + 0.1 p = [0.5886, 0.7848]; b = 0.9 [0.6, 0.8] + g = [1.1286, 1.5048];
        // d = g + 0.9 b = [1.60434, 2.13912]; p = p - 0.1 d = [0.725566, -2.365912].
        opt.step(&vars, &linear_grads(&p, &c), 0.1).unwrap();
        close(&vals(&p), &[0.725566, -2.365912]);
        assert_eq!(opt.state().steps["w"], 2);
    }

    #[test]
    fn sgd_plain_momentum_matches_hand_computation() {
        let p = var(&[1.0]);
        let vars = vec![("w".to_string(), p.clone())];
        let mut opt = Sgd::new(0.5, false, 0.0);
        // g = 2 always. b1 = 2, p = 1 - 0.1*2 = 0.8; b2 = 1 + 2 = 3, p = 0.8 - 0.3 = 0.5.
        opt.step(&vars, &linear_grads(&p, &[2.0]), 0.1).unwrap();
        opt.step(&vars, &linear_grads(&p, &[2.0]), 0.1).unwrap();
        close(&vals(&p), &[0.5]);
    }

    #[test]
    fn adamw_matches_hand_computation() {
        let p = var(&[1.0, -1.0]);
        let vars = vec![("w".to_string(), p.clone())];
        let mut opt = AdamW::new(0.01);
        let lr = 0.1;
        let c = [0.2f32, -0.4];
        // Reference in f64, PyTorch formula.
        let (mut pr, mut m, mut v) = ([1.0f64, -1.0], [0.0f64; 2], [0.0f64; 2]);
        for t in 1..=3 {
            opt.step(&vars, &linear_grads(&p, &c), lr).unwrap();
            for i in 0..2 {
                let g = c[i] as f64;
                pr[i] *= 1.0 - lr * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let bc1 = 1.0 - 0.9f64.powi(t);
                let bc2 = 1.0 - 0.999f64.powi(t);
                pr[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-8);
            }
            close(&vals(&p), &pr);
        }
        // First step of Adam moves by exactly lr * sign(g) (up to eps and decay).
        assert_eq!(opt.state().steps["w"], 3);
    }

    #[test]
    fn params_without_gradient_are_skipped() {
        let (a, b) = (var(&[1.0]), var(&[1.0]));
        let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let mut opt = AdamW::new(0.5);
        opt.step(&vars, &linear_grads(&a, &[1.0]), 0.1).unwrap();
        assert_eq!(vals(&b), vec![1.0], "no gradient: no decay, no update");
        assert!(!opt.state().steps.contains_key("b"));
        assert_ne!(vals(&a), vec![1.0]);
    }

    #[test]
    fn state_roundtrip_resumes_bit_identically() {
        let c = [0.3f32, -0.7, 0.1];
        let run = |split: Option<usize>| -> Vec<f32> {
            let p = var(&[0.5, 0.25, -1.0]);
            let vars = vec![("w".to_string(), p.clone())];
            let mut opt = AdamW::new(0.01);
            for i in 0..6 {
                if Some(i) == split {
                    let bytes = opt.state().to_safetensors().unwrap();
                    let saved = vals(&p);
                    opt = AdamW::new(0.01);
                    opt.load_state(OptimState::from_safetensors(&bytes).unwrap());
                    p.set(&Tensor::from_slice(&saved, 3, &Device::Cpu).unwrap())
                        .unwrap();
                }
                opt.step(&vars, &linear_grads(&p, &c), 0.05).unwrap();
            }
            vals(&p)
        };
        assert_eq!(run(None), run(Some(3)));
        let mut sgd = Sgd::new(0.9, true, 5e-4);
        let p = var(&[1.0]);
        sgd.step(&[("x".into(), p.clone())], &linear_grads(&p, &[1.0]), 0.1)
            .unwrap();
        let st = OptimState::from_safetensors(&sgd.state().to_safetensors().unwrap()).unwrap();
        assert_eq!(st.steps["x"], 1);
        assert!(st.slots.contains_key("momentum_buffer.x"));
    }

    #[test]
    fn warmup_cosine_schedule() {
        let s = WarmupCosine {
            base_lr: 0.1,
            min_lr: 0.0,
            warmup_steps: 4,
            total_steps: 14,
        };
        assert!((s.lr(0) - 0.025).abs() < 1e-12);
        assert!((s.lr(3) - 0.1).abs() < 1e-12);
        assert!((s.lr(4) - 0.1).abs() < 1e-12);
        assert!(
            (s.lr(9) - 0.05).abs() < 1e-12,
            "half-way through the cosine"
        );
        assert!(s.lr(14).abs() < 1e-12);
        assert!(s.lr(100).abs() < 1e-12, "clamped after the end");
        let no_warmup = WarmupCosine {
            warmup_steps: 0,
            ..s
        };
        assert!((no_warmup.lr(0) - 0.1).abs() < 1e-12);
    }
}
