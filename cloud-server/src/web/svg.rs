//! Inline SVG charts, drawn from aggregates only. Colours come from classes in the
//! stylesheet (the content-security policy forbids inline styles); sizes are in viewBox
//! units, so a chart scales to the width it is given, desktop or phone.
use super::esc;
use crate::domain::Distribution;

const W: f64 = 640.0;
const LEFT: f64 = 150.0;
const RIGHT: f64 = 24.0;
const ROW: f64 = 30.0;

/// A "nice" upper bound for an axis (1, 2, 2.5 or 5 times a power of ten) and its step.
fn nice_max(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.25);
    }
    let p = 10f64.powf(max.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= max {
            let top = m * p;
            return (top, top / 4.0);
        }
    }
    (10.0 * p, 2.5 * p)
}

fn num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One row per group: the min–max whisker, the p50–p90 box and the mean's tick. Rows whose
/// extremes were withheld (a group under 2k devices) show the median and mean only.
pub fn distributions(title: &str, unit: &str, rows: &[(String, Distribution)]) -> String {
    let max = rows
        .iter()
        .map(|(_, d)| d.max.max(d.p90).max(d.p50).max(d.mean))
        .fold(0.0, f64::max);
    let (top, step) = nice_max(max);
    let plot = W - LEFT - RIGHT;
    let x = |v: f64| LEFT + plot * (v / top).clamp(0.0, 1.0);
    let h = 36.0 + ROW * rows.len() as f64;
    let mut s = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {h}\" role=\"img\" aria-label=\"{}\">\
         <title>{}</title>",
        esc(title),
        esc(title)
    );
    for i in 0..=4 {
        let v = step * i as f64;
        s += &format!(
            "<line class=\"grid\" x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"8\" y2=\"{1:.1}\"/>\
             <text class=\"tick\" x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{3}</text>",
            x(v),
            h - 22.0,
            h - 8.0,
            num(v)
        );
    }
    for (i, (label, d)) in rows.iter().enumerate() {
        let y = 22.0 + ROW * i as f64;
        s += &format!(
            "<text class=\"label\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 8.0,
            y + 4.0,
            esc(label)
        );
        let detail = if d.extremes_suppressed {
            format!(
                "{label}: median {} {unit}, mean {} {unit} (extremes withheld: fewer than 2k devices)",
                num(d.p50),
                num(d.mean)
            )
        } else {
            format!(
                "{label}: min {}, median {}, p90 {}, max {}, mean {} {unit}",
                num(d.min),
                num(d.p50),
                num(d.p90),
                num(d.max),
                num(d.mean)
            )
        };
        s += &format!("<g><title>{}</title>", esc(&detail));
        if !d.extremes_suppressed {
            s += &format!(
                "<line class=\"whisker\" x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
                 <rect class=\"box\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"12\"/>",
                x(d.min),
                x(d.max),
                x(d.p50),
                y - 6.0,
                (x(d.p90) - x(d.p50)).max(2.0)
            );
        }
        s += &format!(
            "<line class=\"median\" x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1:.1}\" y2=\"{2:.1}\"/>\
             <circle class=\"mean\" cx=\"{3:.1}\" cy=\"{4:.1}\" r=\"3.5\"/></g>",
            x(d.p50),
            y - 8.0,
            y + 8.0,
            x(d.mean),
            y
        );
    }
    s + "</svg>"
}

/// Horizontal bars of counts (subnets in use).
pub fn bars(title: &str, rows: &[(String, u32)]) -> String {
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0) as f64;
    let plot = W - LEFT - RIGHT - 40.0;
    let h = 12.0 + ROW * rows.len() as f64;
    let mut s = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {h}\" role=\"img\" aria-label=\"{}\">\
         <title>{}</title>",
        esc(title),
        esc(title)
    );
    for (i, (label, n)) in rows.iter().enumerate() {
        let y = 8.0 + ROW * i as f64;
        let w = if max > 0.0 {
            plot * *n as f64 / max
        } else {
            0.0
        };
        s += &format!(
            "<text class=\"label mono\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <rect class=\"bar\" x=\"{LEFT}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"18\"/>\
             <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\">{n}</text>",
            LEFT - 8.0,
            y + 13.0,
            esc(label),
            LEFT + w + 6.0,
            y + 13.0
        );
    }
    s + "</svg>"
}

/// One mark of the accuracy–latency chart.
pub struct Mark {
    /// Device class, 0..=5 (the colour).
    pub class: i32,
    pub label: String,
    pub latency_ms: f64,
    pub quality: f64,
    pub devices: u32,
}

/// The fleet's accuracy–latency trade-off of one supernet: one mark per (device class,
/// subnet), placed by the median reported latency (x) and quality (y).
pub fn tradeoff(title: &str, marks: &[Mark], classes: &[(i32, &str)]) -> String {
    let (w, h) = (W, 340.0);
    let (l, r, t, b) = (64.0, 20.0, 16.0, 70.0);
    // 10 % headroom: a mark at the largest latency does not sit on the frame.
    let (xmax, xstep) = nice_max(1.1 * marks.iter().map(|m| m.latency_ms).fold(0.0, f64::max));
    let qmin = marks.iter().map(|m| m.quality).fold(1.0, f64::min);
    // Quality axis from a round tenth below the lowest mark to 1, so close marks separate.
    let ymin = ((qmin * 10.0).floor() / 10.0).clamp(0.0, 0.9);
    let x = |v: f64| l + (w - l - r) * (v / xmax).clamp(0.0, 1.0);
    let y = |q: f64| t + (h - t - b) * (1.0 - ((q - ymin) / (1.0 - ymin)).clamp(0.0, 1.0));
    let mut s = format!(
        "<svg class=\"chart tradeoff\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{}\">\
         <title>{}</title>",
        esc(title),
        esc(title)
    );
    for i in 0..=4 {
        let v = xstep * i as f64;
        s += &format!(
            "<line class=\"grid\" x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{t}\" y2=\"{1:.1}\"/>\
             <text class=\"tick\" x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{3}</text>",
            x(v),
            h - b,
            h - b + 16.0,
            num(v)
        );
        let q = ymin + (1.0 - ymin) * i as f64 / 4.0;
        s += &format!(
            "<line class=\"grid\" x1=\"{l}\" x2=\"{0:.1}\" y1=\"{1:.1}\" y2=\"{1:.1}\"/>\
             <text class=\"tick\" x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"end\">{4:.2}</text>",
            w - r,
            y(q),
            l - 6.0,
            y(q) + 4.0,
            q
        );
    }
    s += &format!(
        "<text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">median latency p50 (ms)</text>\
         <text class=\"axis\" transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\">median quality</text>",
        l + (w - l - r) / 2.0,
        h - b + 34.0,
        t + (h - t - b) / 2.0
    );
    for m in marks {
        s += &format!(
            "<circle class=\"mark c{}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"{:.1}\"><title>{}</title></circle>",
            m.class.clamp(0, 5),
            x(m.latency_ms),
            y(m.quality),
            5.0 + (m.devices as f64).sqrt().min(6.0),
            esc(&format!(
                "{}: {} ms, quality {:.3}, {} devices",
                m.label,
                num(m.latency_ms),
                m.quality,
                m.devices
            ))
        );
    }
    let mut lx = l;
    for (c, name) in classes {
        s += &format!(
            "<circle class=\"mark c{}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"5\"/>\
             <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            (*c).clamp(0, 5),
            lx + 5.0,
            h - 12.0,
            lx + 14.0,
            h - 8.0,
            esc(name)
        );
        lx += 24.0 + 8.0 * name.len() as f64;
    }
    s + "</svg>"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_bounds_are_round_and_cover_the_data() {
        assert_eq!(nice_max(7.3), (10.0, 2.5));
        assert_eq!(nice_max(0.42), (0.5, 0.125));
        assert_eq!(nice_max(0.0), (1.0, 0.25));
        for v in [0.013, 1.0, 3.3, 99.0, 1234.0] {
            assert!(nice_max(v).0 >= v);
        }
    }

    #[test]
    fn labels_are_escaped() {
        let s = bars("t", &[("<x>".into(), 2)]);
        assert!(s.contains("&lt;x&gt;") && !s.contains("<x>"));
    }
}
