//! Subnet codes: one [`Choice`] per block position, and the canonical string form.
//!
//! `0` original block, `1`/`2` start of a merge-2/merge-3 branch, `x` a position covered by the
//! preceding merge, `P`/`p` the lighter/heavier width-pruned copy. Example: `2xx1x0P0`.
//! Manifests and checkpoints store a choice as the research code's integer id (0, 1, 2, -1,
//! -2, 99 for covered); [`Choice`] is the only place that knows the numbers.
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{CoreError, Result};

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

    /// The choice that stands for this kind in a subnet code.
    pub fn choice(self) -> Choice {
        match self {
            BranchKind::Merge2 => Choice::Merge2,
            BranchKind::Merge3 => Choice::Merge3,
            BranchKind::Prune1 => Choice::Prune1,
            BranchKind::Prune2 => Choice::Prune2,
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

/// What stands at one position of a subnet code.
///
/// Declared in the order of the research code's integer ids (-2, -1, 0, 1, 2, 99), so the
/// derived `Ord` orders exactly as those ids did: module maps keyed by [`ModuleKey`], and the
/// manifests and checkpoints written from them, keep their order.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(into = "i8", try_from = "i8")]
pub enum Choice {
    /// The heavier width-pruned copy (`p`, id -2).
    Prune2,
    /// The lighter width-pruned copy (`P`, id -1).
    Prune1,
    /// The oracle's own block (`0`, id 0).
    #[default]
    Original,
    /// Start of a block replacing two (`1`, id 1).
    Merge2,
    /// Start of a block replacing three (`2`, id 2).
    Merge3,
    /// A position covered by the preceding merge (`x`, id 99); nothing runs there.
    Covered,
}

impl Choice {
    /// Every choice, in order.
    pub const ALL: [Choice; 6] = [
        Choice::Prune2,
        Choice::Prune1,
        Choice::Original,
        Choice::Merge2,
        Choice::Merge3,
        Choice::Covered,
    ];

    /// The research code's integer id (what manifests and checkpoints store).
    pub fn id(self) -> i8 {
        match self {
            Choice::Prune2 => -2,
            Choice::Prune1 => -1,
            Choice::Original => 0,
            Choice::Merge2 => 1,
            Choice::Merge3 => 2,
            Choice::Covered => 99,
        }
    }

    pub fn from_id(id: i8) -> Option<Choice> {
        Choice::ALL.into_iter().find(|c| c.id() == id)
    }

    /// The character in the string form.
    pub fn symbol(self) -> char {
        match self {
            Choice::Prune2 => 'p',
            Choice::Prune1 => 'P',
            Choice::Original => '0',
            Choice::Merge2 => '1',
            Choice::Merge3 => '2',
            Choice::Covered => 'x',
        }
    }

    pub fn from_symbol(c: char) -> Option<Choice> {
        Choice::ALL.into_iter().find(|x| x.symbol() == c)
    }

    /// The branch kind, or `None` for the original block and covered positions.
    pub fn kind(self) -> Option<BranchKind> {
        BranchKind::ALL.into_iter().find(|k| k.choice() == self)
    }

    /// How many original blocks a module of this choice replaces (covered: none).
    pub fn span(self) -> usize {
        match self {
            Choice::Covered => 0,
            c => c.kind().map_or(1, BranchKind::span),
        }
    }
}

impl From<Choice> for i8 {
    fn from(c: Choice) -> i8 {
        c.id()
    }
}

impl TryFrom<i8> for Choice {
    type Error = CoreError;
    fn try_from(id: i8) -> Result<Choice> {
        Choice::from_id(id).ok_or_else(|| CoreError::InvalidConfig {
            field: "choice".into(),
            reason: format!("unknown choice id {id} (expected -2, -1, 0, 1, 2 or 99)"),
        })
    }
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.symbol())
    }
}

/// One module of a supernet: a block position and the choice standing there. Its order is
/// position first, then choice, as the `(usize, i8)` tuples it replaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleKey {
    pub pos: usize,
    pub choice: Choice,
}

impl ModuleKey {
    pub fn new(pos: usize, choice: Choice) -> Self {
        Self { pos, choice }
    }

    /// The name in manifests and errors, e.g. `p3c1`, `p5c-2`.
    pub fn name(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for ModuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}c{}", self.pos, self.choice.id())
    }
}

/// A path through the supernet: one entry per block position.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet(pub Vec<Choice>);

impl Subnet {
    /// The all-original subnet (the oracle itself).
    pub fn original(n: usize) -> Self {
        Subnet(vec![Choice::Original; n])
    }

    /// Parses the string form; checks characters and merge spans (`x` only right after the
    /// start of a merge that covers it). Availability of choices is checked against a
    /// supernet by [`super::SupernetSpec::validate`].
    pub fn parse(s: &str) -> Result<Self> {
        let mut v = Vec::with_capacity(s.len());
        for (i, c) in s.chars().enumerate() {
            let id = Choice::from_symbol(c).ok_or_else(|| CoreError::InvalidSubnet {
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
            if id == Choice::Covered {
                return Err(CoreError::InvalidSubnet {
                    position: i,
                    reason: "'x' (covered) without a merge covering it".into(),
                });
            }
            let span = id.span();
            if i + span > n {
                return Err(CoreError::InvalidSubnet {
                    position: i,
                    reason: format!("merge of {span} blocks does not fit in {n} positions"),
                });
            }
            for j in i + 1..i + span {
                if self.0[j] != Choice::Covered {
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

    /// The modules that run, in order (covered positions skipped).
    pub fn steps(&self) -> impl Iterator<Item = ModuleKey> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, &c)| c != Choice::Covered)
            .map(|(i, &c)| ModuleKey::new(i, c))
    }

    /// Whether any position uses a branch (not the oracle path).
    pub fn uses_branch(&self) -> bool {
        self.0.iter().any(|&c| c != Choice::Original)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &c in &self.0 {
            write!(f, "{}", c.symbol())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The enum's order must be the integer ids' order: module maps, manifests and checkpoint
    /// fingerprints were written in that order before the enum existed.
    #[test]
    fn choice_order_is_id_order() {
        let mut by_id = Choice::ALL.to_vec();
        by_id.sort_by_key(|c| c.id());
        assert_eq!(by_id, Choice::ALL.to_vec());
        let mut keys = [
            ModuleKey::new(1, Choice::Prune2),
            ModuleKey::new(0, Choice::Merge3),
            ModuleKey::new(0, Choice::Prune1),
            ModuleKey::new(0, Choice::Original),
        ];
        keys.sort();
        let tuples: Vec<(usize, i8)> = keys.iter().map(|k| (k.pos, k.choice.id())).collect();
        assert_eq!(tuples, vec![(0, -1), (0, 0), (0, 2), (1, -2)]);
    }

    #[test]
    fn choice_ids_symbols_and_serde_round_trip() {
        for c in Choice::ALL {
            assert_eq!(Choice::from_id(c.id()), Some(c));
            assert_eq!(Choice::from_symbol(c.symbol()), Some(c));
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, c.id().to_string());
            assert_eq!(serde_json::from_str::<Choice>(&json).unwrap(), c);
        }
        assert!(Choice::from_id(3).is_none());
        assert!(serde_json::from_str::<Choice>("7").is_err());
        assert_eq!(ModuleKey::new(5, Choice::Prune2).name(), "p5c-2");
        assert_eq!(ModuleKey::new(3, Choice::Merge2).to_string(), "p3c1");
        for k in BranchKind::ALL {
            assert_eq!(k.choice().kind(), Some(k));
            assert_eq!(k.choice().span(), k.span());
        }
        let s = Subnet::parse("2xx1x0P0p").unwrap();
        assert_eq!(s.to_string(), "2xx1x0P0p");
        let steps: Vec<String> = s.steps().map(|k| k.name()).collect();
        assert_eq!(steps, ["p0c2", "p3c1", "p5c0", "p6c-1", "p7c0", "p8c-2"]);
    }
}
