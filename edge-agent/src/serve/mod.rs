//! Serving the active subnet behind an atomic swap.
//!
//! The active model is an `Arc` behind a `RwLock`: a request clones the `Arc` (the lock is
//! held for that clone only) and runs on it, so in-flight requests finish on the old subnet
//! while a switch installs a new one. A switch loads only the modules that differ from the
//! active subnet (the rest share tensor storage) and verifies them; if a load fails, nothing
//! is swapped and the old subnet keeps serving. A new supernet version (hot re-sync) is
//! installed the same way by [`Server::replace`], reusing modules whose blob digest did not
//! change.
//!
//! Every forward pass records its latency in one sliding window: [`Server::window_stats`]
//! (status, heartbeats) reads the whole window, [`Server::take_fresh`] (the controller) only
//! the samples recorded since its previous read, so successive controller windows never
//! overlap and their spread is a fair estimate of the measurement noise.
//!
//! [`grpc`] puts the local `EdgeInference` API on top.
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use adaptivenet_core::artifact::{
    blob_path, decode_module, load_supernet, read_manifest, Manifest,
};
use adaptivenet_core::model::Params;
use adaptivenet_core::supernet::{ModuleKey, Subnet, Supernet};
use adaptivenet_core::CoreError;
use candle_core::Tensor;

use crate::profile::quantile;
use crate::Result;

pub mod bn;
pub mod grpc;

/// A local supernet artifact directory (manifest + verified blobs).
#[derive(Clone, Debug)]
pub struct ArtifactSource {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl ArtifactSource {
    /// Reads and validates the manifest.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(ArtifactSource {
            dir: dir.to_path_buf(),
            manifest: read_manifest(dir)?,
        })
    }

    /// Loads stem, head and the modules of `subnets` (all modules with `None`), with BN
    /// folded into the convs: the device only runs inference, and folded modules take one
    /// fused kernel per layer.
    pub fn load(&self, subnets: Option<&[Subnet]>) -> Result<Supernet> {
        let mut sn = load_supernet(&self.dir, &self.manifest, subnets)?;
        sn.fold()?;
        Ok(sn)
    }

    /// The manifest entry of one module.
    pub fn entry(&self, key: ModuleKey) -> Result<&adaptivenet_core::artifact::ChoiceEntry> {
        Ok(self
            .manifest
            .positions
            .get(key.pos)
            .and_then(|p| p.choices.iter().find(|c| c.id == key.choice))
            .ok_or_else(|| CoreError::Artifact {
                module: key.name(),
                reason: "not in the manifest".into(),
            })?)
    }

    /// Loads and verifies one module, BN folded.
    pub fn load_module(&self, key: ModuleKey) -> Result<Params> {
        let name = key.name();
        let c = self.entry(key)?;
        let path = blob_path(&self.dir, &c.module.sha256);
        let bytes = std::fs::read(&path).map_err(|e| CoreError::Artifact {
            module: name.clone(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        let params = decode_module(&name, &bytes, &c.module, &c.block.param_shapes())?;
        Ok(adaptivenet_core::model::fold::fold_params(
            &params,
            self.manifest.oracle.numerics.bn_eps,
        )?)
    }
}

/// The subnet being served, with only its own modules in memory.
#[derive(Debug)]
pub struct ActiveModel {
    pub subnet: Subnet,
    pub supernet: Supernet,
    /// Increases with every switch; tags latency samples so a window never mixes subnets.
    pub version: u64,
    /// The manifest `supernet_id` the weights come from.
    pub supernet_id: String,
}

/// What a switch did.
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchReport {
    pub from: Subnet,
    pub to: Subnet,
    pub loaded: usize,
    pub reused: usize,
    pub millis: f64,
    /// With recalibration set: whether the target serves recalibrated BN statistics (the
    /// guard may refuse them); `None` without recalibration.
    pub recalibrated: Option<bool>,
}

/// Statistics of a set of latency samples (ms).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowStats {
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    /// The model version the samples were measured on.
    pub version: u64,
}

/// Live latency samples of the active version (a sliding window).
#[derive(Debug)]
struct Window {
    version: u64,
    samples: VecDeque<f64>,
    cap: usize,
    /// Samples recorded since the controller's last [`Server::take_fresh`].
    fresh: usize,
}

impl Window {
    fn stats(&self, last: usize) -> WindowStats {
        let k = last.min(self.samples.len());
        let mut v: Vec<f64> = self
            .samples
            .iter()
            .skip(self.samples.len() - k)
            .copied()
            .collect();
        v.sort_by(f64::total_cmp);
        WindowStats {
            samples: v.len(),
            p50_ms: quantile(&v, 0.5),
            p95_ms: quantile(&v, 0.95),
            version: self.version,
        }
    }
}

/// One answered batch: the scores and exactly which model produced them.
#[derive(Clone, Debug)]
pub struct Inference {
    pub scores: Tensor,
    pub subnet: Subnet,
    pub version: u64,
    pub millis: f64,
}

/// BN recalibration applied by every switch of a [`Server`] (see [`bn`]).
#[derive(Clone, Debug)]
pub struct Recalibration {
    /// Local image batches, already transformed to the model's input.
    pub inputs: Vec<Tensor>,
    pub scope: bn::RecalScope,
    /// Per batch of `inputs`, the predictions to check against (labels, or the oracle's
    /// top-1): when set, a switch keeps the recalibrated statistics only if they predict
    /// these at least as well as the shipped ones ([`bn::guard`]).
    pub guard: Option<Vec<Vec<u32>>>,
}

/// What a recalibrating switch installs, from its one read of the artifact.
struct Prepared {
    /// The modules in scope: recalibrated, or shipped where the guard refused.
    given: BTreeMap<ModuleKey, Params>,
    /// Whether recalibrated statistics serve.
    kept: bool,
    /// Stem, head and the target's modules as shipped, BN folded.
    shipped: Supernet,
}

/// The serving core: active model, swap, live latency window.
#[derive(Debug)]
pub struct Server {
    source: RwLock<ArtifactSource>,
    recal: RwLock<Option<Recalibration>>,
    active: RwLock<Arc<ActiveModel>>,
    switching: Mutex<()>,
    window: Mutex<Window>,
    requests: AtomicU64,
    images: AtomicU64,
}

impl Server {
    /// Loads `subnet`'s modules and starts serving it. `window` is the number of latency
    /// samples kept.
    pub fn start(source: ArtifactSource, subnet: &Subnet, window: usize) -> Result<Server> {
        let supernet = source.load(Some(std::slice::from_ref(subnet)))?;
        Ok(Server {
            active: RwLock::new(Arc::new(ActiveModel {
                subnet: subnet.clone(),
                supernet,
                version: 0,
                supernet_id: source.manifest.supernet_id.to_string(),
            })),
            source: RwLock::new(source),
            recal: RwLock::new(None),
            switching: Mutex::new(()),
            window: Mutex::new(Window {
                version: 0,
                samples: VecDeque::new(),
                cap: window.max(1),
                fresh: 0,
            }),
            requests: AtomicU64::new(0),
            images: AtomicU64::new(0),
        })
    }

    /// The artifact the active model comes from.
    pub fn source(&self) -> ArtifactSource {
        self.source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The model serving now (cheap `Arc` clone).
    pub fn active(&self) -> Arc<ActiveModel> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs one request batch on the active subnet and records its latency.
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.infer_tagged(x)?.scores)
    }

    /// Like [`Server::infer`], also saying which model answered: the request holds that
    /// model's `Arc` for its whole forward pass, so a concurrent switch never mixes subnets.
    pub fn infer_tagged(&self, x: &Tensor) -> Result<Inference> {
        let m = self.active();
        let t = Instant::now();
        let scores = m.supernet.forward(&m.subnet, x)?;
        let millis = t.elapsed().as_secs_f64() * 1e3;
        self.record(m.version, millis);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.images
            .fetch_add(x.dim(0).unwrap_or(0) as u64, Ordering::Relaxed);
        Ok(Inference {
            scores,
            subnet: m.subnet.clone(),
            version: m.version,
            millis,
        })
    }

    /// (requests, images) answered since start.
    pub fn served(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.images.load(Ordering::Relaxed),
        )
    }

    /// Records a latency sample (ms) measured on model `version`; samples of an older
    /// version are dropped, so the window always describes the subnet serving now.
    pub fn record(&self, version: u64, ms: f64) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if version != w.version || !ms.is_finite() {
            return;
        }
        if w.samples.len() == w.cap {
            w.samples.pop_front();
        }
        w.samples.push_back(ms);
        w.fresh += 1;
    }

    /// (samples, p50, p95) of the current window.
    pub fn window_stats(&self) -> (usize, f64, f64) {
        let s = self.window_snapshot();
        (s.samples, s.p50_ms, s.p95_ms)
    }

    /// Statistics of the whole current window.
    pub fn window_snapshot(&self) -> WindowStats {
        let w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        w.stats(w.cap)
    }

    /// Statistics of the samples recorded since the previous call (at most the window's
    /// capacity, the newest ones), once at least `min_samples` are there; `None` before.
    pub fn take_fresh(&self, min_samples: usize) -> Option<WindowStats> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.fresh < min_samples.max(1) {
            return None;
        }
        let s = w.stats(w.fresh);
        w.fresh = 0;
        Some(s)
    }

    /// From now on every switch (and [`Server::replace`]) recalibrates the target subnet's
    /// BN statistics on `r`'s local images (set it once, at start: it cannot be turned off,
    /// since modules reused by later switches would keep recalibrated statistics). Call
    /// [`Server::switch`] to apply it to the active subnet.
    pub fn set_recalibration(&self, r: Recalibration) {
        *self.recal.write().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    /// Switches to `target`, loading only the modules that differ. On error the old subnet
    /// keeps serving. With recalibration set, the modules in its scope are recalibrated for
    /// `target` (their statistics depend on the path, so they are never reused from the
    /// previous subnet; with scope `Branches` the reused originals carry shipped statistics).
    pub fn switch(&self, target: &Subnet) -> Result<SwitchReport> {
        // Recalibrate under the switching lock: a concurrent `replace` must not change the
        // artifact between reading its weights and installing them.
        let _guard = self.switching.lock().unwrap_or_else(|e| e.into_inner());
        let t = Instant::now();
        let prepared = self.recalibrated(&self.source(), target)?;
        let mut report = match prepared {
            Some(p) => {
                let mut r = self.switch_locked(target, p.given, Some(&p.shipped))?;
                r.recalibrated = Some(p.kept);
                r
            }
            None => self.switch_locked(target, BTreeMap::new(), None)?,
        };
        // The switch's time includes its recalibration.
        report.millis = t.elapsed().as_secs_f64() * 1e3;
        Ok(report)
    }

    /// With recalibration set, `target`'s modules in scope recalibrated on `src`'s weights
    /// (or the shipped ones where the guard refused), from one read of the artifact.
    fn recalibrated(&self, src: &ArtifactSource, target: &Subnet) -> Result<Option<Prepared>> {
        let recal = self.recal.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(r) = recal else {
            return Ok(None);
        };
        let raw = bn::load_shipped(src, target)?;
        let m = bn::recalibrate_loaded(&raw, target, &r.inputs, r.scope)?;
        let mut shipped = raw;
        shipped.fold()?;
        let (given, kept) = match &r.guard {
            Some(targets) if !m.is_empty() => bn::guard(&shipped, target, m, &r.inputs, targets)?,
            _ => {
                let any = !m.is_empty();
                (m, any)
            }
        };
        Ok(Some(Prepared {
            given,
            kept,
            shipped,
        }))
    }

    /// Like [`Server::switch`], with some modules given (e.g. BN-recalibrated ones) instead
    /// of being reused or loaded.
    pub fn switch_with(
        &self,
        target: &Subnet,
        given: BTreeMap<ModuleKey, Params>,
    ) -> Result<SwitchReport> {
        let _guard = self.switching.lock().unwrap_or_else(|e| e.into_inner());
        self.switch_locked(target, given, None)
    }

    /// [`Server::switch_with`] for a caller holding the switching lock. Modules neither given
    /// nor held come from `read` (weights already read from the current artifact, folded),
    /// else from the artifact.
    fn switch_locked(
        &self,
        target: &Subnet,
        mut given: BTreeMap<ModuleKey, Params>,
        read: Option<&Supernet>,
    ) -> Result<SwitchReport> {
        let t = Instant::now();
        let cur = self.active();
        let source = self.source();
        cur.supernet.spec.validate(target)?;
        let (mut loaded, mut reused) = (0, 0);
        let mut modules = BTreeMap::new();
        for key in target.steps() {
            let params = match (given.remove(&key), cur.supernet.modules.get(&key)) {
                (Some(m), _) => {
                    loaded += 1;
                    m
                }
                (None, Some(m)) => {
                    reused += 1;
                    m.clone()
                }
                (None, None) => {
                    loaded += 1;
                    match read.and_then(|r| r.modules.get(&key)) {
                        Some(m) => m.clone(),
                        None => source.load_module(key)?,
                    }
                }
            };
            modules.insert(key, params);
        }
        let supernet = Supernet {
            spec: cur.supernet.spec.clone(),
            stem: cur.supernet.stem.clone(),
            head: cur.supernet.head.clone(),
            modules,
        };
        self.install(&cur, target, supernet, None, t, loaded, reused)
    }

    /// Serves `target` from another artifact (a new supernet version): modules whose blob
    /// digest is unchanged are reused, the rest loaded and verified from `source`. On error
    /// the old artifact and subnet keep serving. With recalibration set, `target` is
    /// recalibrated on the new weights, read once.
    pub fn replace(&self, source: ArtifactSource, target: &Subnet) -> Result<SwitchReport> {
        let _guard = self.switching.lock().unwrap_or_else(|e| e.into_inner());
        let t = Instant::now();
        let spec = source.manifest.supernet_spec();
        spec.validate(target)?;
        let prepared = self.recalibrated(&source, target)?;
        let (mut given, read, kept) = match prepared {
            Some(p) => (p.given, Some(p.shipped), Some(p.kept)),
            None => (BTreeMap::new(), None, None),
        };
        let cur = self.active();
        let old = self.source();
        let same_spec = spec == cur.supernet.spec;
        let (mut loaded, mut reused) = (0, 0);
        let mut modules = BTreeMap::new();
        for key in target.steps() {
            let want = &source.entry(key)?.module.sha256;
            let have = old.entry(key).ok().map(|c| &c.module.sha256);
            let params = match (given.remove(&key), cur.supernet.modules.get(&key)) {
                (Some(m), _) => {
                    loaded += 1;
                    m
                }
                (None, Some(m)) if same_spec && have == Some(want) => {
                    reused += 1;
                    m.clone()
                }
                _ => {
                    loaded += 1;
                    match read.as_ref().and_then(|r| r.modules.get(&key)) {
                        Some(m) => m.clone(),
                        None => source.load_module(key)?,
                    }
                }
            };
            modules.insert(key, params);
        }
        let eps = source.manifest.oracle.numerics.bn_eps;
        let mut part = |name: &str,
                        e: &adaptivenet_core::artifact::ModuleEntry,
                        o: &adaptivenet_core::artifact::ModuleEntry,
                        have: &Params,
                        from_read: Option<&Params>,
                        shapes: Vec<(String, Vec<usize>)>|
         -> Result<Params> {
            if same_spec && e.sha256 == o.sha256 {
                reused += 1;
                return Ok(have.clone());
            }
            loaded += 1;
            if let Some(p) = from_read {
                return Ok(p.clone());
            }
            let path = blob_path(&source.dir, &e.sha256);
            let bytes = std::fs::read(&path).map_err(|err| CoreError::Artifact {
                module: name.to_string(),
                reason: format!("cannot read {}: {err}", path.display()),
            })?;
            let p = decode_module(name, &bytes, e, &shapes)?;
            Ok(adaptivenet_core::model::fold::fold_params(&p, eps)?)
        };
        let m = &source.manifest;
        let stem = part(
            "stem",
            &m.stem,
            &old.manifest.stem,
            &cur.supernet.stem,
            read.as_ref().map(|r| &r.stem),
            m.oracle.stem.param_shapes(),
        )?;
        let head = part(
            "head",
            &m.head,
            &old.manifest.head,
            &cur.supernet.head,
            read.as_ref().map(|r| &r.head),
            m.oracle.head.param_shapes(),
        )?;
        let supernet = Supernet {
            spec,
            stem,
            head,
            modules,
        };
        let mut report = self.install(&cur, target, supernet, Some(source), t, loaded, reused)?;
        report.recalibrated = kept;
        Ok(report)
    }

    /// Swaps in the new model (and source); callers hold the switching lock.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        cur: &ActiveModel,
        target: &Subnet,
        supernet: Supernet,
        source: Option<ArtifactSource>,
        t: Instant,
        loaded: usize,
        reused: usize,
    ) -> Result<SwitchReport> {
        let supernet_id = match &source {
            Some(s) => s.manifest.supernet_id.to_string(),
            None => cur.supernet_id.clone(),
        };
        let next = Arc::new(ActiveModel {
            subnet: target.clone(),
            supernet,
            version: cur.version + 1,
            supernet_id,
        });
        let version = next.version;
        {
            // Source and model change together: readers of either see a consistent pair
            // once the active model is swapped.
            let mut src = self.source.write().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = source {
                *src = s;
            }
            *self.active.write().unwrap_or_else(|e| e.into_inner()) = next;
        }
        {
            let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
            w.version = version;
            w.samples.clear();
            w.fresh = 0;
        }
        Ok(SwitchReport {
            from: cur.subnet.clone(),
            to: target.clone(),
            loaded,
            reused,
            millis: t.elapsed().as_secs_f64() * 1e3,
            recalibrated: None,
        })
    }
}
