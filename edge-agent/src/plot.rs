//! SVG plots of what an agent decided, from its persisted state only (no model, no data):
//! - the Pareto front of the search (latency per the table vs local quality): every evaluated
//!   subnet grey when the search record lists them, the front in blue, the subnet chosen for
//!   each budget in red, the subnet served last (if another one) in orange, the budgets as
//!   dashed lines;
//! - the adaptation timeline from `timeline.jsonl` (one JSON object per maintenance window:
//!   `t_s`, `p50_ms`, `p95_ms`, `budget_ms`, `subnet`, `event`): live p50 / p95 against the
//!   budget over time, with subnet switches marked.
//!
//! SVG only (plotters' SVG backend with its naive text layout): no fonts or image codecs on
//! the device, and the files open in any browser.
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Deserialize;

use crate::search::{BudgetResult, Candidate};
use crate::state::{ActiveRecord, StateDir, Versioned};
use crate::{EdgeError, Result};

/// Name of the timeline file in a state directory.
pub const TIMELINE_FILE: &str = "timeline.jsonl";

const GREY: RGBColor = RGBColor(170, 170, 170);
const FRONT: RGBColor = RGBColor(31, 119, 180);
const CHOSEN: RGBColor = RGBColor(214, 39, 40);
const ACTIVE: RGBColor = RGBColor(255, 127, 14);
const P95: RGBColor = RGBColor(148, 103, 189);

/// What the Pareto plot shows.
#[derive(Clone, Debug, Default)]
pub struct ParetoData {
    /// Every evaluated subnet (empty when the search record does not keep them).
    pub evaluated: Vec<Candidate>,
    /// The front, by increasing latency.
    pub front: Vec<Candidate>,
    /// The best subnet per budget.
    pub best: Vec<BudgetResult>,
    /// The subnet served last, if known.
    pub active: Option<Candidate>,
}

impl ParetoData {
    /// Markers the plot draws as circles: evaluated + front + one per budget + the active
    /// subnet when it is not one of the budget choices.
    pub fn circle_count(&self) -> usize {
        self.evaluated.len() + self.front.len() + self.best.len() + usize::from(self.extra_active())
    }

    fn extra_active(&self) -> bool {
        self.active
            .as_ref()
            .is_some_and(|a| self.best.iter().all(|b| b.best.subnet != a.subnet))
    }
}

/// One maintenance window of the adaptation timeline.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct TimelineWindow {
    /// Seconds since serving started.
    pub t_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub budget_ms: f64,
    /// The subnet served in this window.
    #[serde(default)]
    pub subnet: String,
    /// A switch or other event in this window (absent, null or empty: none).
    #[serde(default)]
    pub event: Option<serde_json::Value>,
}

impl TimelineWindow {
    /// The event's text, if the window has one.
    pub fn event_text(&self) -> Option<String> {
        match &self.event {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => None,
            Some(serde_json::Value::String(s)) if s.trim().is_empty() => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v) => Some(v.to_string()),
        }
    }
}

fn plot_err(e: impl std::fmt::Display) -> EdgeError {
    EdgeError::config("plot", e.to_string())
}

fn corrupt(path: &Path, reason: impl Into<String>) -> EdgeError {
    EdgeError::CorruptState {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Reads the search record (and the active subnet) of a state directory, whatever supernet
/// it was written for.
pub fn read_pareto(state: &Path) -> Result<ParetoData> {
    let sd = StateDir::new(state);
    let path = sd.search_path();
    let bytes = std::fs::read(&path).map_err(|e| EdgeError::io(&path, e))?;
    let v: Versioned<serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, e.to_string()))?;
    let result = v
        .data
        .get("result")
        .ok_or_else(|| corrupt(&path, "no result"))?;
    let field = |name: &str| -> Result<Vec<serde_json::Value>> {
        match result.get(name) {
            None | Some(serde_json::Value::Null) => Ok(Vec::new()),
            Some(serde_json::Value::Array(a)) => Ok(a.clone()),
            Some(_) => Err(corrupt(&path, format!("result.{name} is not a list"))),
        }
    };
    let parse = |name: &str| -> Result<Vec<Candidate>> {
        field(name)?
            .into_iter()
            .map(|c| serde_json::from_value(c).map_err(|e| corrupt(&path, format!("{name}: {e}"))))
            .collect()
    };
    let front = parse("front")?;
    // Newer records may keep every evaluated subnet; older ones only the front.
    let evaluated = match result.get("evaluated") {
        Some(_) => parse("evaluated")?,
        None => Vec::new(),
    };
    let best: Vec<BudgetResult> = field("best")?
        .into_iter()
        .map(|b| serde_json::from_value(b).map_err(|e| corrupt(&path, format!("best: {e}"))))
        .collect::<Result<_>>()?;
    if front.is_empty() {
        return Err(corrupt(&path, "the Pareto front is empty"));
    }
    let active = read_active(&sd)?.and_then(|a| {
        front
            .iter()
            .chain(&evaluated)
            .find(|c| c.subnet == a.subnet)
            .cloned()
    });
    Ok(ParetoData {
        evaluated,
        front,
        best,
        active,
    })
}

fn read_active(sd: &StateDir) -> Result<Option<ActiveRecord>> {
    let path = sd.active_path();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EdgeError::io(&path, e)),
    };
    let v: Versioned<ActiveRecord> =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, e.to_string()))?;
    Ok(Some(v.data))
}

/// Reads `timeline.jsonl`: `Ok(None)` when the file does not exist; a malformed line is an
/// error naming its line number (blank lines are skipped).
pub fn read_timeline(path: &Path) -> Result<Option<Vec<TimelineWindow>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EdgeError::io(path, e)),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let w: TimelineWindow = serde_json::from_str(line)
            .map_err(|e| corrupt(path, format!("line {}: {e}", i + 1)))?;
        if ![w.t_s, w.p50_ms, w.p95_ms, w.budget_ms]
            .iter()
            .all(|x| x.is_finite())
        {
            return Err(corrupt(path, format!("line {}: non-finite number", i + 1)));
        }
        out.push(w);
    }
    Ok(Some(out))
}

/// `[lo, hi]` padded by `pad` of its width (a degenerate range gets a unit width).
fn padded(lo: f64, hi: f64, pad: f64) -> (f64, f64) {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    };
    let w = hi - lo;
    (lo - pad * w, hi + pad * w)
}

fn min_max(it: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    it.filter(|x| x.is_finite()).fold(None, |acc, x| match acc {
        None => Some((x, x)),
        Some((a, b)) => Some((a.min(x), b.max(x))),
    })
}

/// The Pareto plot as an SVG document.
pub fn pareto_svg(d: &ParetoData, title: &str) -> Result<String> {
    let all = || {
        d.evaluated
            .iter()
            .chain(&d.front)
            .chain(d.best.iter().map(|b| &b.best))
            .chain(&d.active)
    };
    let (x0, x1) = min_max(
        all()
            .map(|c| c.latency_ms)
            .chain(d.best.iter().map(|b| b.budget_ms)),
    )
    .ok_or_else(|| plot_err("nothing to plot"))?;
    let (y0, y1) = min_max(all().map(|c| c.quality)).ok_or_else(|| plot_err("nothing to plot"))?;
    let (x0, x1) = padded(x0, x1, 0.06);
    let (y0, y1) = padded(y0, y1, 0.08);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (860, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("latency per the calibrated table (ms)")
            .y_desc("local quality (%)")
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(plot_err)?;
        if !d.evaluated.is_empty() {
            chart
                .draw_series(
                    d.evaluated
                        .iter()
                        .map(|c| Circle::new((c.latency_ms, c.quality), 3, GREY.filled())),
                )
                .map_err(plot_err)?
                .label(format!("evaluated ({})", d.evaluated.len()))
                .legend(|(x, y)| Rectangle::new([(x, y - 4), (x + 8, y + 4)], GREY.filled()));
        }
        chart
            .draw_series(LineSeries::new(
                d.front.iter().map(|c| (c.latency_ms, c.quality)),
                FRONT.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(format!("Pareto front ({})", d.front.len()))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], FRONT.stroke_width(2)));
        chart
            .draw_series(
                d.front
                    .iter()
                    .map(|c| Circle::new((c.latency_ms, c.quality), 4, FRONT.filled())),
            )
            .map_err(plot_err)?;
        for (i, b) in d.best.iter().enumerate() {
            let s = chart
                .draw_series(DashedLineSeries::new(
                    [(b.budget_ms, y0), (b.budget_ms, y1)],
                    6,
                    4,
                    CHOSEN.stroke_width(1),
                ))
                .map_err(plot_err)?;
            if i == 0 {
                s.label("budget").legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], CHOSEN.stroke_width(1))
                });
            }
            chart
                .draw_series(std::iter::once(
                    EmptyElement::at((b.best.latency_ms, b.best.quality))
                        + Circle::new((0, 0), 7, CHOSEN.stroke_width(2))
                        + Text::new(
                            format!(
                                "{} ({:.2} ms, {:.1}%)",
                                b.best.subnet, b.best.latency_ms, b.best.quality
                            ),
                            (-10, 10),
                            ("sans-serif", 13).into_font().color(&CHOSEN),
                        ),
                ))
                .map_err(plot_err)?;
        }
        if d.extra_active() {
            if let Some(a) = &d.active {
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at((a.latency_ms, a.quality))
                            + Circle::new((0, 0), 7, ACTIVE.stroke_width(2))
                            + Text::new(
                                format!("served last: {}", a.subnet),
                                (-10, -22),
                                ("sans-serif", 13).into_font().color(&ACTIVE),
                            ),
                    ))
                    .map_err(plot_err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// The adaptation timeline as an SVG document (one p50 marker per window, one triangle per
/// event).
pub fn timeline_svg(w: &[TimelineWindow], title: &str) -> Result<String> {
    let (x0, x1) = min_max(w.iter().map(|x| x.t_s)).ok_or_else(|| plot_err("empty timeline"))?;
    let (_, y1) = min_max(w.iter().flat_map(|x| [x.p50_ms, x.p95_ms, x.budget_ms]))
        .ok_or_else(|| plot_err("empty timeline"))?;
    let (x0, x1) = padded(x0, x1, 0.02);
    let y1 = if y1 > 0.0 { y1 * 1.15 } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, 0.0..y1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("time serving (s)")
            .y_desc("live latency (ms)")
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(plot_err)?;
        // The budget as a step line (it changes only when the fleet's policy does).
        let mut steps = Vec::with_capacity(2 * w.len());
        for (i, x) in w.iter().enumerate() {
            if i > 0 {
                steps.push((x.t_s, w[i - 1].budget_ms));
            }
            steps.push((x.t_s, x.budget_ms));
        }
        chart
            .draw_series(DashedLineSeries::new(steps, 6, 4, CHOSEN.stroke_width(2)))
            .map_err(plot_err)?
            .label("budget")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], CHOSEN.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                w.iter().map(|x| (x.t_s, x.p95_ms)),
                P95.stroke_width(1),
            ))
            .map_err(plot_err)?
            .label("p95")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], P95.stroke_width(1)));
        chart
            .draw_series(LineSeries::new(
                w.iter().map(|x| (x.t_s, x.p50_ms)),
                FRONT.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label("p50")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], FRONT.stroke_width(2)));
        chart
            .draw_series(
                w.iter()
                    .map(|x| Circle::new((x.t_s, x.p50_ms), 2, FRONT.filled())),
            )
            .map_err(plot_err)?;
        for x in w.iter().filter(|x| x.event_text().is_some()) {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x.t_s, 0.0), (x.t_s, y1)],
                    ACTIVE.mix(0.6).stroke_width(1),
                )))
                .map_err(plot_err)?;
            let label = if x.subnet.is_empty() {
                x.event_text().unwrap_or_default()
            } else {
                format!("-> {}", x.subnet)
            };
            chart
                .draw_series(std::iter::once(
                    EmptyElement::at((x.t_s, y1))
                        + TriangleMarker::new((0, 8), 6, ACTIVE.filled())
                        + Text::new(
                            label,
                            (4, 16),
                            ("sans-serif", 12).into_font().color(&ACTIVE),
                        ),
                ))
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Files written by [`plot_state_dir`].
#[derive(Clone, Debug, PartialEq)]
pub struct PlotFiles {
    pub pareto: PathBuf,
    /// `None` with the reason when there is no (usable) timeline.
    pub timeline: std::result::Result<PathBuf, String>,
}

/// Writes `pareto.svg` (and `timeline.svg` when the state directory has a non-empty
/// `timeline.jsonl`) into `out`.
pub fn plot_state_dir(state: &Path, out: &Path, title: &str) -> Result<PlotFiles> {
    let data = read_pareto(state)?;
    std::fs::create_dir_all(out).map_err(|e| EdgeError::io(out, e))?;
    let pareto = out.join("pareto.svg");
    let svg = pareto_svg(&data, &format!("{title}: Pareto front"))?;
    std::fs::write(&pareto, svg).map_err(|e| EdgeError::io(&pareto, e))?;
    let tl_path = state.join(TIMELINE_FILE);
    let timeline = match read_timeline(&tl_path)? {
        None => Err(format!(
            "no {} yet: timeline plot skipped",
            tl_path.display()
        )),
        Some(w) if w.is_empty() => Err(format!(
            "{} is empty: timeline plot skipped",
            tl_path.display()
        )),
        Some(w) => {
            let p = out.join("timeline.svg");
            let svg = timeline_svg(&w, &format!("{title}: adaptation timeline"))?;
            std::fs::write(&p, svg).map_err(|e| EdgeError::io(&p, e))?;
            Ok(p)
        }
    };
    Ok(PlotFiles { pareto, timeline })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::{SearchConfig, SearchResult, SearchStats};
    use crate::state::SearchRecord;
    use adaptivenet_core::supernet::Subnet;

    fn cand(code: &str, l: f64, q: f64) -> Candidate {
        Candidate {
            subnet: Subnet::parse(code).expect("valid code"),
            latency_ms: l,
            quality: q,
        }
    }

    const CODES: [&str; 12] = [
        "00000", "1x000", "01x00", "001x0", "0001x", "1x1x0", "1x01x", "01x1x", "2xx00", "02xx0",
        "002xx", "2xx1x",
    ];

    fn count(svg: &str, tag: &str) -> usize {
        let doc = roxmltree::Document::parse(svg).expect("well-formed SVG");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.tag_name().name() == tag)
            .count()
    }

    fn state_with_search(dir: &Path, evaluated: bool) -> ParetoData {
        let all: Vec<Candidate> = (0..12)
            .map(|i| cand(CODES[i], 1.0 + i as f64 * 0.3, 50.0 + ((i * 7) % 11) as f64))
            .collect();
        let front = crate::search::pareto_front(&all);
        let best = vec![BudgetResult {
            budget_ms: 3.0,
            best: crate::search::best_within(&all, 3.0).expect("fits"),
        }];
        let result = SearchResult {
            best: best.clone(),
            front: front.clone(),
            stats: SearchStats::default(),
        };
        let rec = SearchRecord {
            config: SearchConfig::default(),
            result,
        };
        let sd = StateDir::new(dir);
        sd.save_search("sn", &rec).expect("save");
        if evaluated {
            // A record that also keeps every evaluated subnet.
            let p = sd.search_path();
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
            v["data"]["result"]["evaluated"] = serde_json::to_value(&all).expect("value");
            std::fs::write(&p, serde_json::to_vec(&v).expect("json")).expect("write");
        }
        // The subnet served last: the fastest front entry (the controller stepped down).
        sd.save_active(
            "sn",
            &ActiveRecord {
                subnet: front[0].subnet.clone(),
                budget_ms: 3.0,
            },
        )
        .expect("active");
        ParetoData {
            evaluated: if evaluated { all } else { Vec::new() },
            front: front.clone(),
            best,
            active: Some(front[0].clone()),
        }
    }

    #[test]
    fn pareto_plot_has_one_marker_per_point() {
        for evaluated in [false, true] {
            let dir = tempfile::tempdir().expect("tmp");
            let want = state_with_search(dir.path(), evaluated);
            let got = read_pareto(dir.path()).expect("read");
            assert_eq!(got.front, want.front);
            assert_eq!(got.evaluated.len(), want.evaluated.len());
            assert_eq!(got.active, want.active);
            let out = dir.path().join("plots");
            let files = plot_state_dir(dir.path(), &out, "dev").expect("plot");
            let svg = std::fs::read_to_string(&files.pareto).expect("svg");
            assert!(want.front.len() >= 2 && want.front[0] != want.best[0].best);
            // evaluated + front + the budget's choice + the (different) active subnet
            assert_eq!(count(&svg, "circle"), want.circle_count());
            assert_eq!(
                want.circle_count(),
                want.evaluated.len() + want.front.len() + 2
            );
            assert!(svg.contains(&want.best[0].best.subnet.to_string()));
            assert!(files
                .timeline
                .as_ref()
                .is_err_and(|m| m.contains("skipped")));
            assert!(!out.join("timeline.svg").exists());
        }
    }

    #[test]
    fn timeline_plot_marks_every_window_and_switch() {
        let dir = tempfile::tempdir().expect("tmp");
        state_with_search(dir.path(), false);
        let mut lines = String::new();
        for i in 0..20 {
            let event = match i {
                7 => "\"switch\"",
                15 => "\"switched 2xx0 -> 0000\"",
                3 => "\"\"",
                _ => "null",
            };
            lines.push_str(&format!(
                "{{\"t_s\":{i},\"p50_ms\":{},\"p95_ms\":{},\"budget_ms\":3.0,\"subnet\":\"00{}\",\"event\":{event}}}\n",
                2.0 + (i % 4) as f64 * 0.4,
                3.0 + (i % 4) as f64 * 0.5,
                i / 8,
            ));
        }
        lines.push('\n');
        std::fs::write(dir.path().join(TIMELINE_FILE), lines).expect("write");
        let out = dir.path().join("plots");
        let files = plot_state_dir(dir.path(), &out, "dev").expect("plot");
        let tl = files.timeline.expect("timeline written");
        let svg = std::fs::read_to_string(tl).expect("svg");
        assert_eq!(count(&svg, "circle"), 20, "one p50 marker per window");
        assert_eq!(count(&svg, "polygon"), 2, "one triangle per switch");
    }

    #[test]
    fn bad_state_is_an_error_naming_the_file_never_a_panic() {
        let dir = tempfile::tempdir().expect("tmp");
        let err = plot_state_dir(dir.path(), &dir.path().join("o"), "x").expect_err("missing");
        assert!(err.to_string().contains("search.json"), "{err}");
        std::fs::write(dir.path().join("search.json"), b"{not json").expect("write");
        let err = read_pareto(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("search.json"), "{err}");
        state_with_search(dir.path(), false);
        std::fs::write(
            dir.path().join(TIMELINE_FILE),
            "{\"t_s\":0,\"p50_ms\":1,\"p95_ms\":2,\"budget_ms\":3}\n{\"t_s\":\"soon\"}\n",
        )
        .expect("write");
        let err = plot_state_dir(dir.path(), &dir.path().join("o"), "x").expect_err("line 2");
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
