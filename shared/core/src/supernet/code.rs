//! Subnet codes: one integer per block position, and the canonical string form.
//!
//! `0` original block, `1`/`2` start of a merge-2/merge-3 branch, `x` a position covered by the
//! preceding merge, `P`/`p` the lighter/heavier width-pruned copy. Example: `2xx1x0P0`.
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{CoreError, Result};

/// Marker for a position covered by a merge (99 in the research code).
pub const COVERED: i8 = 99;

/// What stands at a position: the original block or one of the branch kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchKind {
    /// One block replacing two.
    Merge2,
    /// One block replacing three.
    Merge3,
    /// Width-pruned copy, lighter level (20% of ResNet / 25% of MBConv inner channels removed).
    Prune1,
    /// Width-pruned copy, heavier level (40% / 50% removed).
    Prune2,
}

impl BranchKind {
    pub const ALL: [BranchKind; 4] = [
        BranchKind::Merge2,
        BranchKind::Merge3,
        BranchKind::Prune1,
        BranchKind::Prune2,
    ];

    /// The choice id of this kind (research-code convention).
    pub fn id(self) -> i8 {
        match self {
            BranchKind::Merge2 => 1,
            BranchKind::Merge3 => 2,
            BranchKind::Prune1 => -1,
            BranchKind::Prune2 => -2,
        }
    }

    /// How many original blocks the branch replaces.
    pub fn span(self) -> usize {
        match self {
            BranchKind::Merge2 => 2,
            BranchKind::Merge3 => 3,
            BranchKind::Prune1 | BranchKind::Prune2 => 1,
        }
    }

    pub fn from_id(id: i8) -> Option<BranchKind> {
        BranchKind::ALL.into_iter().find(|k| k.id() == id)
    }

    /// The config name of this kind (what [`BranchKind::parse`] reads).
    pub fn name(self) -> &'static str {
        match self {
            BranchKind::Merge2 => "merge2",
            BranchKind::Merge3 => "merge3",
            BranchKind::Prune1 => "prune1",
            BranchKind::Prune2 => "prune2",
        }
    }

    /// Parses a config name (`merge2`, `merge3`, `prune1`, `prune2`).
    pub fn parse(name: &str) -> Result<BranchKind> {
        match name {
            "merge2" => Ok(BranchKind::Merge2),
            "merge3" => Ok(BranchKind::Merge3),
            "prune1" => Ok(BranchKind::Prune1),
            "prune2" => Ok(BranchKind::Prune2),
            other => Err(CoreError::InvalidConfig {
                field: "branches".into(),
                reason: format!(
                    "unknown branch kind {other:?} (expected merge2, merge3, prune1, prune2)"
                ),
            }),
        }
    }
}

/// The character of a choice id in the string form.
pub fn id_char(id: i8) -> Option<char> {
    Some(match id {
        0 => '0',
        1 => '1',
        2 => '2',
        COVERED => 'x',
        -1 => 'P',
        -2 => 'p',
        _ => return None,
    })
}

fn char_id(c: char) -> Option<i8> {
    Some(match c {
        '0' => 0,
        '1' => 1,
        '2' => 2,
        'x' => COVERED,
        'P' => -1,
        'p' => -2,
        _ => return None,
    })
}

/// A path through the supernet: one entry per block position.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet(pub Vec<i8>);

impl Subnet {
    /// The all-original subnet (the oracle itself).
    pub fn original(n: usize) -> Self {
        Subnet(vec![0; n])
    }

    /// Parses the string form; checks characters and merge spans (`x` only right after the
    /// start of a merge that covers it). Availability of choices is checked against a
    /// supernet by [`super::SupernetSpec::validate`].
    pub fn parse(s: &str) -> Result<Self> {
        let mut v = Vec::with_capacity(s.len());
        for (i, c) in s.chars().enumerate() {
            let id = char_id(c).ok_or_else(|| CoreError::InvalidSubnet {
                position: i,
                reason: format!("unknown character {c:?} (expected one of 0 1 2 x P p)"),
            })?;
            v.push(id);
        }
        let sub = Subnet(v);
        sub.check_spans()?;
        Ok(sub)
    }

    /// Checks that merges are followed by exactly their covered markers.
    pub fn check_spans(&self) -> Result<()> {
        let n = self.0.len();
        let mut i = 0;
        while i < n {
            let id = self.0[i];
            if id == COVERED {
                return Err(CoreError::InvalidSubnet {
                    position: i,
                    reason: "'x' (covered) without a merge covering it".into(),
                });
            }
            let span = BranchKind::from_id(id).map_or(1, |k| k.span());
            if id_char(id).is_none() {
                return Err(CoreError::InvalidSubnet {
                    position: i,
                    reason: format!("unknown choice id {id}"),
                });
            }
            if i + span > n {
                return Err(CoreError::InvalidSubnet {
                    position: i,
                    reason: format!("merge of {span} blocks does not fit in {n} positions"),
                });
            }
            for j in i + 1..i + span {
                if self.0[j] != COVERED {
                    return Err(CoreError::InvalidSubnet {
                        position: j,
                        reason: format!("expected 'x': covered by the merge starting at {i}"),
                    });
                }
            }
            i += span;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The (position, choice id) pairs that run, in order (covered positions skipped).
    pub fn steps(&self) -> impl Iterator<Item = (usize, i8)> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, &id)| id != COVERED)
            .map(|(i, &id)| (i, id))
    }

    /// Whether any position uses a branch (not the oracle path).
    pub fn uses_branch(&self) -> bool {
        self.0.iter().any(|&id| id != 0)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &id in &self.0 {
            write!(f, "{}", id_char(id).unwrap_or('?'))?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Subnet {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        Subnet::parse(s)
    }
}

impl TryFrom<String> for Subnet {
    type Error = CoreError;
    fn try_from(s: String) -> Result<Self> {
        Subnet::parse(&s)
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}
