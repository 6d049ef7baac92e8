//! The plan checked against labels, on the device (`edge-agent evaluate`).
//!
//! A label-free search ranks subnets by their agreement with the oracle; a user who does hold
//! labels for some local data wants to see what that ranking costs. [`evaluate_plan`] scores,
//! on every local image, the subnet the search chose per budget as the agent serves it (with
//! its BN recalibration reproduced) and the oracle as shipped, and names the front's best
//! subnet within the same budget by labels on the search's own images: the pick a search of
//! that front with labels would make. The numbers stay on the device: the agent never reports
//! them, and no label or image leaves the process.
use std::collections::BTreeMap;

use adaptivenet_core::data::Dataset;
use adaptivenet_core::supernet::Subnet;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::quality::{count_correct, search_batches, top1};
use crate::search::{best_within, Candidate};
use crate::serve::bn::{local_recalibration, RecalSetting};
use crate::serve::{ArtifactSource, Server};
use crate::state::SearchRecord;
use crate::{EdgeError, Result};

/// Batch of the scored images; only speed depends on it.
const EVAL_BATCH: usize = 100;

/// One subnet as it serves, scored on the device's labelled data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub subnet: Subnet,
    /// Calibrated table latency, ms.
    pub latency_ms: f64,
    /// The quality the search recorded (agreement when label-free), percent.
    pub search_quality: f64,
    /// Top-1 accuracy against the labels on every local image, percent.
    pub accuracy: f64,
    /// Top-1 agreement with the shipped oracle on every local image, percent.
    pub agreement: f64,
    /// Top-1 accuracy on the images the search scored, percent.
    pub search_images_accuracy: f64,
}

/// One budget of the search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetEval {
    pub budget_ms: f64,
    /// The search's choice.
    pub chosen: Scored,
    /// The front's best within the budget by labels on the search's images.
    pub labelled_pick: Scored,
    /// `chosen.accuracy / oracle_accuracy`.
    pub retained: f64,
}

/// The whole check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanEval {
    /// Local images scored (all of them).
    pub images: usize,
    /// Of those, the images the search scored.
    pub search_images: usize,
    /// The shipped oracle's top-1 accuracy on every local image, percent.
    pub oracle_accuracy: f64,
    pub budgets: Vec<BudgetEval>,
}

/// `ds`'s labels as the model's class indices: by class name where every local class names
/// one of `model_classes`; as they are when no local name matches (e.g. folders `0`..`9`) and
/// every label is a valid index. A partial match is refused, since guessing would mis-score.
pub fn labels_for_model(ds: &Dataset, model_classes: &[String]) -> Result<Vec<u32>> {
    let found: Vec<Option<usize>> = ds
        .class_names
        .iter()
        .map(|n| model_classes.iter().position(|m| m == n))
        .collect();
    if found.iter().all(Option::is_some) {
        return Ok(ds
            .labels
            .iter()
            .map(|&l| found[l as usize].unwrap_or_default() as u32)
            .collect());
    }
    if found.iter().all(Option::is_none) && ds.class_names.len() <= model_classes.len() {
        return Ok(ds.labels.clone());
    }
    let missing: Vec<&str> = ds
        .class_names
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    Err(EdgeError::NoData(format!(
        "local classes {missing:?} are not among the model's classes {model_classes:?}"
    )))
}

/// Scores what the search in `rec` chose on `ds` (see the module doc). `ds`'s labels are
/// mapped to the model's classes by [`labels_for_model`].
pub fn evaluate_plan(
    src: &ArtifactSource,
    rec: &SearchRecord,
    ds: &Dataset,
    recal: Option<RecalSetting>,
) -> Result<PlanEval> {
    let first = rec
        .result
        .best
        .first()
        .ok_or_else(|| EdgeError::NoData("the search result holds no budget".into()))?;
    let input = &src.manifest.input;
    let mut ds = ds.clone();
    ds.labels = labels_for_model(&ds, &input.class_names)?;
    let seed = rec.config.seed;
    // The search scored the first `n` images of a seeded shuffle (all with 0).
    let n = rec.result.stats.images;
    let (all_x, all_y) = search_batches(input, &ds, 0, EVAL_BATCH, seed)?;
    let (search_x, search_y) = search_batches(input, &ds, n, EVAL_BATCH, seed)?;
    let count = |xs: &[Tensor]| xs.iter().map(|x| x.dim(0).unwrap_or(0)).sum::<usize>();

    let oracle = Subnet::original(src.manifest.supernet_spec().num_positions());
    let shipped = src.load(Some(std::slice::from_ref(&oracle)))?;
    let oracle_top1 = |xs: &[Tensor]| -> Result<Vec<Vec<u32>>> {
        xs.iter()
            .map(|x| top1(&shipped.forward(&oracle, x)?))
            .collect()
    };
    let all_oracle = oracle_top1(&all_x)?;
    let oracle_accuracy = percent(
        all_oracle
            .iter()
            .zip(&all_y)
            .map(|(p, y)| p.iter().zip(y).filter(|(a, b)| a == b).count())
            .sum(),
        count(&all_x),
    );

    let server = Server::start(src.clone(), &first.best.subnet, 1)?;
    if let Some(r) = recal {
        server.set_recalibration(local_recalibration(src, &ds, n, seed, r)?);
    }
    let mut cache: BTreeMap<Subnet, Scored> = BTreeMap::new();
    let mut score = |c: &Candidate| -> Result<Scored> {
        if let Some(s) = cache.get(&c.subnet) {
            return Ok(s.clone());
        }
        // A switch installs the subnet exactly as serving would (recalibrated if set).
        server.switch(&c.subnet)?;
        let m = server.active();
        let (mut right, mut agree, mut search_right) = (0, 0, 0);
        for ((x, y), o) in all_x.iter().zip(&all_y).zip(&all_oracle) {
            let logits = m.supernet.forward(&m.subnet, x)?;
            right += count_correct(&logits, y)?;
            agree += count_correct(&logits, o)?;
        }
        for (x, y) in search_x.iter().zip(&search_y) {
            search_right += count_correct(&m.supernet.forward(&m.subnet, x)?, y)?;
        }
        let s = Scored {
            subnet: c.subnet.clone(),
            latency_ms: c.latency_ms,
            search_quality: c.quality,
            accuracy: percent(right, count(&all_x)),
            agreement: percent(agree, count(&all_x)),
            search_images_accuracy: percent(search_right, count(&search_x)),
        };
        cache.insert(c.subnet.clone(), s.clone());
        Ok(s)
    };
    let mut budgets = Vec::new();
    for b in &rec.result.best {
        let chosen = score(&b.best)?;
        let mut by_labels = vec![Candidate {
            quality: chosen.search_images_accuracy,
            ..b.best.clone()
        }];
        for c in rec
            .result
            .front
            .iter()
            .filter(|c| c.latency_ms <= b.budget_ms)
        {
            let s = score(c)?;
            by_labels.push(Candidate {
                quality: s.search_images_accuracy,
                ..c.clone()
            });
        }
        // Another subnet only if labels rank it strictly higher: a tie is no disagreement.
        let labelled_pick = match best_within(&by_labels, f64::INFINITY) {
            Some(p) if p.quality > chosen.search_images_accuracy => score(&p)?,
            _ => chosen.clone(),
        };
        budgets.push(BudgetEval {
            budget_ms: b.budget_ms,
            retained: if oracle_accuracy > 0.0 {
                chosen.accuracy / oracle_accuracy
            } else {
                0.0
            },
            chosen,
            labelled_pick,
        });
    }
    Ok(PlanEval {
        images: count(&all_x),
        search_images: count(&search_x),
        oracle_accuracy,
        budgets,
    })
}

fn percent(correct: usize, of: usize) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * correct as f64 / of as f64
    }
}
