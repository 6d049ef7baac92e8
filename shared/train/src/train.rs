//! Shared training machinery: trainable modules, the deterministic batch sampler, losses and
//! evaluation.
use std::collections::HashMap;

use adaptivenet_core::data::{shuffled_indices, AugmentPolicy, Dataset, Normalize, Transform};
use adaptivenet_core::model::spec::is_running_stat;
use adaptivenet_core::model::{Model, Params, TrainCtx};
use candle_core::{Device, Tensor, Var, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// PyTorch's BatchNorm momentum.
pub const BN_MOMENTUM: f64 = 0.1;

/// One module being trained: its trainable tensors as variables, its BN running statistics
/// as plain tensors (updated from [`TrainCtx`] after each train-mode forward).
#[derive(Debug)]
pub struct TrainModule {
    pub vars: Vec<(String, Var)>,
    pub running: Params,
}

impl TrainModule {
    /// Copies `params` into fresh variables (running statistics stay tensors).
    pub fn new(params: &Params) -> candle_core::Result<Self> {
        let mut vars = Vec::new();
        let mut running = Params::new();
        for (n, t) in params {
            if is_running_stat(n) {
                running.insert(n.clone(), t.copy()?);
            } else {
                vars.push((n.clone(), Var::from_tensor(&t.contiguous()?.copy()?)?));
            }
        }
        Ok(Self { vars, running })
    }

    /// The tensors for a forward pass (variables track gradients).
    pub fn params(&self) -> Params {
        let mut p = self.running.clone();
        for (n, v) in &self.vars {
            p.insert(n.clone(), v.as_tensor().clone());
        }
        p
    }

    /// A detached snapshot of every tensor (for export, evaluation and checkpoints).
    pub fn snapshot(&self) -> candle_core::Result<Params> {
        let mut p = Params::new();
        for (n, t) in &self.running {
            p.insert(n.clone(), t.copy()?);
        }
        for (n, v) in &self.vars {
            p.insert(n.clone(), v.as_detached_tensor().copy()?);
        }
        Ok(p)
    }

    /// Stores the running statistics a train-mode forward recorded.
    pub fn apply(&mut self, ctx: &mut TrainCtx) {
        ctx.apply(&mut self.running);
    }

    /// Overwrites every tensor from `p` (resume); names must match.
    pub fn load(&mut self, p: &Params) -> candle_core::Result<()> {
        for (n, v) in &self.vars {
            let t = p
                .get(n)
                .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks {n}")))?;
            v.set(t)?;
        }
        for (n, t) in self.running.iter_mut() {
            *t = p
                .get(n)
                .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks {n}")))?
                .copy()?;
        }
        Ok(())
    }

    /// The variables under `prefix.` names (for the optimizer).
    pub fn named_vars(&self, prefix: &str) -> impl Iterator<Item = (String, Var)> + '_ {
        let prefix = prefix.to_string();
        self.vars
            .iter()
            .map(move |(n, v)| (format!("{prefix}.{n}"), v.clone()))
    }
}

/// The training transform: the dataset's normalisation plus its augmentation policy. Images
/// are already at the input size (read through the dataset's input spec), so this is
/// [`adaptivenet_core::data::InputSpec::train_transform`] without a resize; nothing is
/// flipped or cropped unless the policy asks.
pub fn train_transform(normalize: &Normalize, policy: &AugmentPolicy) -> Transform {
    let t = eval_transform(normalize);
    if policy.crop_padding > 0 || policy.hflip {
        t.augment(policy.crop_padding, policy.hflip)
    } else {
        t
    }
}

/// The evaluation transform: the dataset's normalisation only.
pub fn eval_transform(normalize: &Normalize) -> Transform {
    Transform::new().normalize(normalize.clone())
}

/// The ChaCha8 stream of step `step` of stage `stage`: a pure function of its arguments.
pub fn step_rng(seed: u64, stage: u64, step: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_e1a5_71f1_ca7e);
    rng.set_stream(stage.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ step);
    rng
}

/// Sample order of the training data: a fresh seeded permutation every epoch, consumed by a
/// global sample position, so the batch of any step is known from the position alone.
#[derive(Debug)]
pub struct BatchSampler {
    pub n: usize,
    pub seed: u64,
    cache: HashMap<u64, Vec<usize>>,
}

impl BatchSampler {
    pub fn new(n: usize, seed: u64) -> Self {
        Self {
            n,
            seed,
            cache: HashMap::new(),
        }
    }

    /// The `batch` indices starting at global sample position `pos` (may straddle epochs).
    pub fn batch(&mut self, pos: u64, batch: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch);
        for k in pos..pos + batch as u64 {
            let epoch = k / self.n as u64;
            if !self.cache.contains_key(&epoch) {
                // Keep only the current and next epoch.
                self.cache.retain(|&e, _| e + 1 >= epoch);
                let seed = self.seed.wrapping_mul(0x100_0000_01b3) ^ epoch;
                self.cache.insert(epoch, shuffled_indices(self.n, seed));
            }
            out.push(self.cache[&epoch][(k % self.n as u64) as usize]);
        }
        out
    }
}

/// Cross-entropy (mean over the batch) of logits `[B, K]` against u32 labels `[B]`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::loss::cross_entropy(logits, labels)
}

/// Hinton's distillation loss `T^2 * KL(softmax(t/T) || softmax(s/T))`, averaged over the
/// batch (PyTorch `kl_div(..., reduction="batchmean") * T^2`).
pub fn kd_loss(student: &Tensor, teacher: &Tensor, t: f64) -> candle_core::Result<Tensor> {
    let b = student.dim(0)? as f64;
    let log_s = candle_nn::ops::log_softmax(&student.affine(1.0 / t, 0.0)?, D::Minus1)?;
    let log_t = candle_nn::ops::log_softmax(&teacher.detach().affine(1.0 / t, 0.0)?, D::Minus1)?;
    let p_t = log_t.exp()?;
    let kl = (p_t * (log_t - log_s)?)?.sum_all()?;
    kl.affine(t * t / b, 0.0)
}

/// Mean squared error over all elements.
pub fn mse(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    (a - b)?.sqr()?.mean_all()
}

/// Number of correct top-1 predictions.
pub fn correct(logits: &Tensor, labels: &Tensor) -> candle_core::Result<u64> {
    let pred = logits.argmax(D::Minus1)?;
    let hits = pred
        .eq(labels)?
        .to_dtype(candle_core::DType::F32)?
        .sum_all()?;
    Ok(hits.to_scalar::<f32>()? as u64)
}

/// Top-1 accuracy of a model on a dataset normalised by `normalize` (eval mode, no
/// augmentation).
pub fn accuracy(
    model: &Model,
    data: &Dataset,
    normalize: &Normalize,
    batch: usize,
) -> adaptivenet_core::Result<f64> {
    let t = eval_transform(normalize);
    let mut hits = 0;
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let (x, y) = data.batch_tensor(chunk, &t, &Device::Cpu)?;
        hits += correct(&model.forward(&x)?, &y)?;
    }
    Ok(hits as f64 / data.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_is_a_permutation_per_epoch_and_position_addressable() {
        let mut s = BatchSampler::new(10, 7);
        let a = s.batch(0, 10);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let b = s.batch(10, 10);
        assert_ne!(a, b, "epochs are reshuffled");
        let straddle = BatchSampler::new(10, 7).batch(7, 6);
        assert_eq!(&straddle[..3], &a[7..]);
        assert_eq!(&straddle[3..], &b[..3]);
    }

    #[test]
    fn kd_loss_is_zero_for_equal_logits_and_positive_otherwise() {
        let s = Tensor::new(&[[1f32, 2., 3.], [0., -1., 2.]], &Device::Cpu).unwrap();
        let z = kd_loss(&s, &s, 4.0).unwrap().to_scalar::<f32>().unwrap();
        assert!(z.abs() < 1e-6);
        let t = Tensor::new(&[[3f32, 2., 1.], [0., -1., 2.]], &Device::Cpu).unwrap();
        let p = kd_loss(&s, &t, 1.0).unwrap().to_scalar::<f32>().unwrap();
        // Row 1: KL(softmax([3,2,1]) || softmax([1,2,3])) = sum p (log p - log q); row 2: 0.
        let pt = [0.665241f64, 0.244728, 0.090031];
        let (lp, lq) = (
            [-0.407606f64, -1.407606, -2.407606],
            [-2.407606f64, -1.407606, -0.407606],
        );
        let kl: f64 = (0..3).map(|i| pt[i] * (lp[i] - lq[i])).sum();
        assert!((p as f64 - kl / 2.0).abs() < 1e-4, "{p} vs {}", kl / 2.0);
    }

    /// A 1x1x4 image whose left and right halves differ: a flip would reverse it.
    fn left_right() -> Dataset {
        Dataset::new(vec![10, 20, 30, 40], vec![0], (1, 1, 4), vec!["a".into()]).unwrap()
    }

    #[test]
    fn a_policy_without_flip_never_flips() {
        let ds = left_right();
        let n = Normalize::Raw;
        let no_flip = train_transform(&n, &AugmentPolicy::default());
        assert!(no_flip.augment.is_none());
        let crop_only = train_transform(
            &n,
            &AugmentPolicy {
                crop_padding: 1,
                hflip: false,
            },
        );
        let flip = train_transform(
            &n,
            &AugmentPolicy {
                crop_padding: 0,
                hflip: true,
            },
        );
        let mut flipped = 0;
        for step in 0..64 {
            let mut rng = step_rng(3, 0, step);
            let (x, _) = ds
                .batch_tensor_augmented(&[0], &no_flip, &mut rng, &Device::Cpu)
                .unwrap();
            assert_eq!(
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                [10., 20., 30., 40.]
            );
            let mut rng = step_rng(3, 0, step);
            let (x, _) = ds
                .batch_tensor_augmented(&[0], &crop_only, &mut rng, &Device::Cpu)
                .unwrap();
            // A crop shifts the row (zeros come in at one end); it never reverses it.
            let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let nonzero: Vec<f32> = v.iter().copied().filter(|&p| p != 0.0).collect();
            assert!(nonzero.windows(2).all(|w| w[0] < w[1]), "{v:?}");
            let mut rng = step_rng(3, 0, step);
            let (x, _) = ds
                .batch_tensor_augmented(&[0], &flip, &mut rng, &Device::Cpu)
                .unwrap();
            if x.flatten_all().unwrap().to_vec1::<f32>().unwrap() == [40., 30., 20., 10.] {
                flipped += 1;
            }
        }
        // The same draws with the flip on do flip: the sample can tell left from right.
        assert!(flipped > 0 && flipped < 64, "{flipped}");
    }

    #[test]
    fn step_rng_depends_on_stage_and_step() {
        use rand::RngCore;
        let a = step_rng(1, 0, 5).next_u64();
        assert_eq!(a, step_rng(1, 0, 5).next_u64());
        assert_ne!(a, step_rng(1, 1, 5).next_u64());
        assert_ne!(a, step_rng(1, 0, 6).next_u64());
        assert_ne!(a, step_rng(2, 0, 5).next_u64());
    }
}
