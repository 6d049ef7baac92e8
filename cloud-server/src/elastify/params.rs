//! The `params_json` of an elastification job: parsed and range-checked by
//! `StartElastification` before a job is queued, and again by the runner (a row written by an
//! older server, or by hand, must not train with nonsense either).
//!
//! Every error is INVALID_ARGUMENT naming `params_json.KEY`: an unknown key, a value of the
//! wrong type and a value out of range alike, so a typo never silently trains with defaults.
use adaptivenet_core::model::ModelSpec;
use adaptivenet_core::supernet::branches::supernet_spec;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::fit::DataShape;
use crate::error::{CloudError, Result};
use adaptivenet_train::{BranchBn, ElastifyConfig, InplaceDistill};

/// Largest `params_json` accepted (bytes).
pub const MAX_PARAMS_JSON: usize = 64 << 10;
/// Most steps of one stage (3,000 is the default; a million is days on a big GPU box).
pub const MAX_STAGE_STEPS: u64 = 1_000_000;
/// Most branch kinds listed (there are four; duplicates are harmless but bounded).
pub const MAX_BRANCHES: usize = 16;
/// Most images held out for the priors.
pub const MAX_VAL_SIZE: usize = 1_000_000;
/// Most subnets evaluated for the priors (each one is a pass over the held-out split).
pub const MAX_PRIORS: usize = 10_000;
/// Most training images (`max_train_images`).
pub const MAX_TRAIN_IMAGES: usize = 1 << 32;

/// The job's parameters: every field optional (defaults below), unknown fields rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobParams {
    pub branches: Vec<String>,
    pub seed: u64,
    pub stage0_steps: u64,
    pub stage1_steps: u64,
    pub batch: usize,
    pub lr_stage0: f64,
    pub lr_stage1: f64,
    pub temperature: f64,
    /// Weight of an original block against 1 per branch when sampling paths.
    pub original_weight: f64,
    /// Stage 1, the sandwich rule: each step trains the smallest and the largest path plus
    /// `sandwich_random` random ones.
    pub sandwich: bool,
    pub sandwich_random: u32,
    /// With `sandwich`: `off`, `oracle` or `largest` (the teacher of the paths other than the
    /// largest, which then learn from soft labels only).
    pub inplace_distill: InplaceDistill,
    /// `batch` (train-mode BN in branches, the paper), `frozen` (branch BN on statistics
    /// estimated on the oracle's features before training, then fixed), `calibrated` (batch
    /// training, then statistics estimated on the oracle's features with the trained weights)
    /// or `auto` (calibrated for MBConv oracles, batch otherwise).
    pub branch_bn: BranchBn,
    /// Checkpoint every this many steps (0: only on cancel and at the end).
    pub checkpoint_every: u64,
    /// Images held out of training for the cloud-side priors.
    pub val_size: usize,
    /// Subnets evaluated for the priors (all if the space is at most this large).
    pub priors: usize,
    /// Train on at most this many images (0: all); quick presets use a subset.
    pub max_train_images: usize,
}

impl Default for JobParams {
    fn default() -> Self {
        let c = ElastifyConfig::default();
        Self {
            branches: c.branches,
            seed: c.seed,
            stage0_steps: c.stage0_steps,
            stage1_steps: c.stage1_steps,
            batch: c.batch,
            lr_stage0: c.lr_stage0,
            lr_stage1: c.lr_stage1,
            temperature: c.temperature,
            original_weight: c.original_weight,
            sandwich: c.sandwich,
            sandwich_random: c.sandwich_random,
            inplace_distill: c.inplace_distill,
            branch_bn: c.branch_bn,
            checkpoint_every: 50,
            val_size: 1000,
            priors: 160,
            max_train_images: 0,
        }
    }
}

/// `params_json.KEY`, with a hostile key shortened and escaped so that the message stays
/// small and printable.
fn key_field(key: &str) -> String {
    let k: String = key.chars().take(64).collect();
    let more = if k.len() < key.len() { "…" } else { "" };
    if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        format!("params_json.{k}{more}")
    } else {
        format!("params_json.{k:?}{more}")
    }
}

/// A value for an error message, shortened.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 64 {
        s
    } else {
        let cut: String = s.chars().take(60).collect();
        format!("{cut}…")
    }
}

impl JobParams {
    /// The keys `params_json` may hold.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(Self::default()) {
            Ok(Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Parses and validates `params_json` (empty means defaults). Errors name
    /// `params_json.KEY`: unknown keys, wrong types and out-of-range values.
    pub fn parse(json: &str) -> Result<Self> {
        if json.trim().is_empty() {
            return Ok(Self::default());
        }
        if json.len() > MAX_PARAMS_JSON {
            return Err(CloudError::invalid(
                "params_json",
                format!("larger than {} KiB", MAX_PARAMS_JSON >> 10),
            ));
        }
        let obj: Map<String, Value> = match serde_json::from_str::<Value>(json) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(CloudError::invalid("params_json", "must be a JSON object")),
            Err(e) => {
                return Err(CloudError::invalid(
                    "params_json",
                    format!("must be a JSON object: {e}"),
                ))
            }
        };
        let keys = Self::keys();
        for (k, v) in &obj {
            if !keys.iter().any(|known| known == k) {
                return Err(CloudError::invalid(
                    key_field(k),
                    format!("unknown key (known: {})", keys.join(", ")),
                ));
            }
            // One key at a time, so that a type error names its key.
            let one = Value::Object(Map::from_iter([(k.clone(), v.clone())]));
            serde_json::from_value::<Self>(one)
                .map_err(|e| CloudError::invalid(key_field(k), format!("{}: {e}", show(v))))?;
        }
        let p: Self = serde_json::from_value(Value::Object(obj))
            .map_err(|e| CloudError::invalid("params_json", e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// Range checks of every field; the recipe's own rules come from
    /// [`ElastifyConfig::validate`], their field mapped to `params_json.KEY`.
    pub fn validate(&self) -> Result<()> {
        let range = |key: &str, v: u64, lo: u64, hi: u64| -> Result<()> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(CloudError::invalid(
                    key_field(key),
                    format!("{v} not in {lo}..={hi}"),
                ))
            }
        };
        range("stage0_steps", self.stage0_steps, 1, MAX_STAGE_STEPS)?;
        range("stage1_steps", self.stage1_steps, 1, MAX_STAGE_STEPS)?;
        range(
            "checkpoint_every",
            self.checkpoint_every,
            0,
            MAX_STAGE_STEPS,
        )?;
        range("val_size", self.val_size as u64, 1, MAX_VAL_SIZE as u64)?;
        range("priors", self.priors as u64, 1, MAX_PRIORS as u64)?;
        range(
            "max_train_images",
            self.max_train_images as u64,
            0,
            MAX_TRAIN_IMAGES as u64,
        )?;
        if self.branches.len() > MAX_BRANCHES {
            return Err(CloudError::invalid(
                key_field("branches"),
                format!("{} entries (at most {MAX_BRANCHES})", self.branches.len()),
            ));
        }
        self.config().validate().map_err(|e| self.name_key(e))?;
        Ok(())
    }

    /// Refuses a branch kind that fits no block of `oracle`'s chain (e.g. `merge3` on a
    /// two-block oracle), and kinds that together leave the supernet no choice to train.
    pub fn check_oracle(&self, oracle: &ModelSpec, oracle_name: &str) -> Result<()> {
        let sn = self.config().validate().map_err(|e| self.name_key(e))?;
        // The worker applies the same rule: default kinds where they fit, named kinds must fit.
        let sn = self
            .config()
            .kinds_for(oracle, sn)
            .map_err(|e| match CloudError::from(e) {
                CloudError::InvalidArgument { reason, .. } => CloudError::invalid(
                    key_field("branches"),
                    format!("oracle '{oracle_name}': {reason}"),
                ),
                other => other,
            })?;
        if supernet_spec(oracle, &sn).count() <= 1 {
            return Err(CloudError::invalid(
                key_field("branches"),
                format!(
                    "no {:?} branch fits oracle '{oracle_name}' ({} blocks)",
                    self.branches,
                    oracle.blocks.len()
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a `val_size` that leaves no training image of `data` (when its size is known).
    pub fn check_dataset(&self, data: &DataShape) -> Result<()> {
        match data.train_images {
            Some(n) if self.val_size as u64 >= n => Err(CloudError::invalid(
                key_field("val_size"),
                format!(
                    "{} not below the {n} training images of dataset '{}'",
                    self.val_size, data.name
                ),
            )),
            _ => Ok(()),
        }
    }

    /// An [`ElastifyConfig::validate`] error on one of this struct's fields, renamed to the
    /// `params_json` key; other errors unchanged.
    fn name_key(&self, e: impl Into<CloudError>) -> CloudError {
        match e.into() {
            CloudError::InvalidArgument { field, reason } if Self::keys().contains(&field) => {
                CloudError::invalid(key_field(&field), reason)
            }
            other => other,
        }
    }

    /// The recipe these parameters describe.
    pub fn config(&self) -> ElastifyConfig {
        ElastifyConfig {
            branches: self.branches.clone(),
            seed: self.seed,
            stage0_steps: self.stage0_steps,
            stage1_steps: self.stage1_steps,
            batch: self.batch,
            lr_stage0: self.lr_stage0,
            lr_stage1: self.lr_stage1,
            temperature: self.temperature,
            original_weight: self.original_weight,
            sandwich: self.sandwich,
            sandwich_random: self.sandwich_random,
            inplace_distill: self.inplace_distill,
            branch_bn: self.branch_bn,
            checkpoint_every: self.checkpoint_every,
            ..ElastifyConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key an INVALID_ARGUMENT names.
    fn refused(json: &str) -> String {
        match JobParams::parse(json) {
            Err(CloudError::InvalidArgument { field, reason }) => {
                assert!(!reason.is_empty());
                field
            }
            other => panic!("{json}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_every_key_parses_back() {
        assert_eq!(JobParams::parse("").unwrap(), JobParams::default());
        assert_eq!(JobParams::parse(" {} ").unwrap(), JobParams::default());
        let all = serde_json::to_string(&JobParams::default()).unwrap();
        assert_eq!(JobParams::parse(&all).unwrap(), JobParams::default());
        assert_eq!(JobParams::keys().len(), 17);
    }

    #[test]
    fn good_values_are_kept() {
        let p = JobParams::parse(
            r#"{"branches":["merge2","prune1"],"seed":7,"stage0_steps":1,"stage1_steps":1000000,
                "batch":4096,"lr_stage0":1.0,"lr_stage1":1e-6,"temperature":100,
                "original_weight":0.5,"checkpoint_every":0,"val_size":1,"priors":1,
                "max_train_images":0,"sandwich":true,"sandwich_random":16,
                "inplace_distill":"largest"}"#,
        )
        .unwrap();
        assert!(p.sandwich);
        assert_eq!(p.sandwich_random, 16);
        assert_eq!(p.inplace_distill, InplaceDistill::Largest);
        let c = p.config();
        assert_eq!(
            (c.sandwich, c.sandwich_random, c.inplace_distill),
            (true, 16, InplaceDistill::Largest)
        );
        for (name, want) in [
            ("off", InplaceDistill::Off),
            ("oracle", InplaceDistill::Oracle),
        ] {
            let json = format!(r#"{{"sandwich":true,"inplace_distill":"{name}"}}"#);
            assert_eq!(JobParams::parse(&json).unwrap().inplace_distill, want);
        }
        // Random paths may be none: then a step trains just the two ends.
        let ends = JobParams::parse(r#"{"sandwich":true,"sandwich_random":0}"#).unwrap();
        assert_eq!(ends.config().paths_per_step(1), 2);
        assert_eq!(p.branches, ["merge2", "prune1"]);
        assert_eq!((p.seed, p.stage0_steps, p.stage1_steps), (7, 1, 1_000_000));
        assert_eq!((p.batch, p.val_size, p.priors), (4096, 1, 1));
        assert_eq!(p.lr_stage0, 1.0);
        assert_eq!(p.original_weight, 0.5);
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        for (json, key) in [
            (r#"{"stage0_steps":0}"#, "stage0_steps"),
            (r#"{"stage1_steps":0}"#, "stage1_steps"),
            (r#"{"stage0_steps":1000001}"#, "stage0_steps"),
            (r#"{"batch":0}"#, "batch"),
            (r#"{"batch":4097}"#, "batch"),
            (r#"{"lr_stage0":-1}"#, "lr_stage0"),
            (r#"{"lr_stage0":0}"#, "lr_stage0"),
            (r#"{"lr_stage1":1.5}"#, "lr_stage1"),
            (r#"{"temperature":0}"#, "temperature"),
            (r#"{"temperature":-4}"#, "temperature"),
            (r#"{"temperature":101}"#, "temperature"),
            (r#"{"original_weight":0}"#, "original_weight"),
            (r#"{"original_weight":-0.5}"#, "original_weight"),
            (r#"{"original_weight":11}"#, "original_weight"),
            (r#"{"checkpoint_every":1000001}"#, "checkpoint_every"),
            (r#"{"val_size":0}"#, "val_size"),
            (r#"{"val_size":1000001}"#, "val_size"),
            (r#"{"priors":0}"#, "priors"),
            (r#"{"priors":10001}"#, "priors"),
            (r#"{"max_train_images":4294967297}"#, "max_train_images"),
            (r#"{"branches":[]}"#, "branches"),
            (r#"{"branches":["merge4"]}"#, "branches"),
            (
                r#"{"sandwich":true,"sandwich_random":17}"#,
                "sandwich_random",
            ),
            (r#"{"sandwich_random":4294967295}"#, "sandwich_random"),
            // In-place distillation needs the sandwich's largest path.
            (r#"{"inplace_distill":"oracle"}"#, "inplace_distill"),
            (
                r#"{"sandwich":false,"inplace_distill":"largest"}"#,
                "inplace_distill",
            ),
        ] {
            assert_eq!(refused(json), format!("params_json.{key}"), "{json}");
        }
        let many = format!(r#"{{"branches":[{}]}}"#, vec!["\"merge2\""; 17].join(","));
        assert_eq!(refused(&many), "params_json.branches");
    }

    #[test]
    fn wrong_types_and_negative_integers_name_their_key() {
        for (json, key) in [
            (r#"{"stage0_steps":-5}"#, "stage0_steps"),
            (r#"{"stage0_steps":1.5}"#, "stage0_steps"),
            (r#"{"stage0_steps":"10"}"#, "stage0_steps"),
            (r#"{"batch":-1}"#, "batch"),
            (r#"{"lr_stage0":"NaN"}"#, "lr_stage0"),
            (r#"{"temperature":"inf"}"#, "temperature"),
            (r#"{"temperature":null}"#, "temperature"),
            (r#"{"branches":"merge2"}"#, "branches"),
            (r#"{"branches":[2]}"#, "branches"),
            (r#"{"seed":-1}"#, "seed"),
            (r#"{"seed":18446744073709551616}"#, "seed"),
            (r#"{"sandwich":1}"#, "sandwich"),
            (r#"{"sandwich":"true"}"#, "sandwich"),
            (r#"{"sandwich_random":-1}"#, "sandwich_random"),
            (r#"{"sandwich_random":2.5}"#, "sandwich_random"),
            (r#"{"inplace_distill":"teacher"}"#, "inplace_distill"),
            (r#"{"inplace_distill":true}"#, "inplace_distill"),
        ] {
            assert_eq!(refused(json), format!("params_json.{key}"), "{json}");
        }
    }

    #[test]
    fn unknown_keys_are_named_and_hostile_keys_kept_short() {
        assert_eq!(refused(r#"{"epochs":1}"#), "params_json.epochs");
        assert_eq!(refused(r#"{"lr":0.1}"#), "params_json.lr");
        let long = "k".repeat(5000);
        let field = refused(&format!(r#"{{"{long}":1}}"#));
        assert!(
            field.starts_with("params_json.kkk") && field.len() < 100,
            "{field}"
        );
        let field = refused(r#"{"a\nb\u0000":1}"#);
        assert!(!field.chars().any(char::is_control), "{field:?}");
    }

    #[test]
    fn not_an_object_is_refused_as_a_whole() {
        // Not JSON at all (NaN, a number beyond f64) cannot be traced to a key.
        for json in [
            "[1]",
            "1",
            "\"x\"",
            "{",
            "{\"batch\":NaN}",
            "{\"lr_stage1\":1e309}",
        ] {
            assert_eq!(refused(json), "params_json", "{json}");
        }
        let big = format!(r#"{{"seed":1{}}}"#, " ".repeat(MAX_PARAMS_JSON));
        assert_eq!(refused(&big), "params_json");
    }

    #[test]
    fn branches_must_fit_the_oracle_and_val_size_the_data() {
        let two = adaptivenet_core::model::ArchDescriptor::from_json(
            br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[2],"widths":[8],"in_channels":1,"num_classes":10}"#,
        )
        .unwrap()
        .spec;
        let merge3 = JobParams::parse(r#"{"branches":["merge3"]}"#).unwrap();
        match merge3.check_oracle(&two, "tiny") {
            Err(CloudError::InvalidArgument { field, reason }) => {
                assert_eq!(field, "params_json.branches");
                assert!(
                    reason.starts_with("oracle 'tiny': merge3 does not fit"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        JobParams::parse(r#"{"branches":["merge2"]}"#)
            .unwrap()
            .check_oracle(&two, "tiny")
            .unwrap();
        // The default kinds (merge2, merge3) apply where they fit: a three-block chain with two
        // strided blocks has room for merge2 only, and that is not an error...
        let three = adaptivenet_core::model::ArchDescriptor::from_json(
            br#"{"family":"adaptivenet.resnet_small","block":"basic","layers":[1,1,1],"widths":[8,16,16],"in_channels":1,"num_classes":10}"#,
        )
        .unwrap()
        .spec;
        JobParams::parse("{}")
            .unwrap()
            .check_oracle(&three, "tiny")
            .unwrap();
        // ... while the same merge3, named, is refused.
        assert!(merge3.check_oracle(&three, "tiny").is_err());
        let p = JobParams::parse(r#"{"val_size":60}"#).unwrap();
        let data = |n| DataShape {
            name: "d".into(),
            channels: None,
            size: None,
            classes: None,
            train_images: n,
        };
        p.check_dataset(&data(Some(61))).unwrap();
        p.check_dataset(&data(None)).unwrap();
        match p.check_dataset(&data(Some(60))) {
            Err(CloudError::InvalidArgument { field, reason }) => {
                assert_eq!(field, "params_json.val_size");
                assert!(
                    reason.contains("60 training images of dataset 'd'"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
