//! The supernets view: versions, where each fleet's labels point, the subnet space of each
//! version (count, parameter and MAC range from its manifest), and per version the fleet's
//! accuracy–latency chart from the floored aggregates.
use std::collections::{BTreeSet, HashMap};

use adaptivenet_core::artifact::Manifest;
use tonic::metadata::MetadataMap;
use uuid::Uuid;

use super::views::{class_name, utc};
use super::{esc, svg};
use crate::api::dashboard::aggregates_for;
use crate::api::management_fleet;
use crate::app::App;
use crate::auth::Access;
use crate::domain::Page;
use crate::error::Result;

/// `1.23 M` style counts.
fn si(v: u64) -> String {
    let f = v as f64;
    match v {
        0..=9_999 => v.to_string(),
        10_000..=9_999_999 => format!("{:.1} k", f / 1e3),
        10_000_000..=9_999_999_999 => format!("{:.2} M", f / 1e6),
        _ => format!("{:.2} G", f / 1e9),
    }
}

/// The supernet catalogue as the token may read it (every token reads the catalogue; a
/// fleet-scoped token sees only its own fleet's labels and aggregates).
pub async fn supernets(app: &App, md: &MetadataMap, fleet: Option<Uuid>) -> Result<String> {
    let (p, fleet) = management_fleet(app, md, Access::Read, || Ok(fleet)).await?;
    let list = app
        .store()
        .list_supernets(Page::new(1000, "")?, None)
        .await?;
    let labels = app.store().list_labels(fleet).await?;
    let mut fleets: HashMap<Uuid, String> = HashMap::new();
    for f in labels.iter().map(|l| l.fleet_id).collect::<BTreeSet<_>>() {
        fleets.insert(f, app.store().get_fleet(f).await?.name);
    }
    let agg = aggregates_for(app, &p, fleet).await?;
    let mut s = String::from(
        "<h2 id=\"view-title\">Supernets</h2><div class=\"scroll\"><table id=\"supernets\"><thead><tr>\
         <th scope=\"col\">Supernet</th><th scope=\"col\">Version</th><th scope=\"col\">Labels</th>\
         <th scope=\"col\">Subnets</th><th scope=\"col\">Parameters</th><th scope=\"col\">MACs</th>\
         <th scope=\"col\">Modules</th><th scope=\"col\">Created</th></tr></thead><tbody>",
    );
    let mut charts = String::new();
    for sn in list.iter().rev() {
        let (_, manifest, _) = app.store().get_supernet_full(sn.id).await?;
        let (count, params, macs) = match Manifest::from_json(manifest.as_bytes()) {
            Ok(m) => {
                let spec = m.supernet_spec();
                let ((p0, p1), (m0, m1)) = spec.cost_range();
                (
                    spec.count().to_string(),
                    format!("{} – {}", si(p0), si(p1)),
                    format!("{} – {}", si(m0), si(m1)),
                )
            }
            Err(e) => {
                tracing::warn!(supernet = %sn.id, error = %e, "stored manifest unreadable");
                ("?".into(), "?".into(), "?".into())
            }
        };
        let here: Vec<String> = labels
            .iter()
            .filter(|l| l.supernet_id == sn.id)
            .map(|l| format!("{} / {}", fleets[&l.fleet_id], l.label))
            .collect();
        s += &format!(
            "<tr data-supernet-id=\"{}\"><td>{}</td><td class=\"num\">v{}</td><td>{}</td>\
             <td class=\"num\" data-field=\"subnets\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            sn.id,
            esc(&sn.name),
            sn.version,
            if here.is_empty() {
                "—".to_string()
            } else {
                esc(&here.join(", "))
            },
            esc(&count),
            esc(&params),
            esc(&macs),
            sn.num_modules,
            utc(sn.created_ms)
        );
        let groups: Vec<_> = agg
            .groups
            .iter()
            .filter(|g| g.supernet_id == sn.id)
            .collect();
        if groups.is_empty() {
            continue;
        }
        let mut marks = Vec::new();
        let mut classes: Vec<(i32, &str)> = Vec::new();
        for g in &groups {
            classes.push((g.device_class.0, class_name(g.device_class)));
            for pt in &g.points {
                marks.push(svg::Mark {
                    class: g.device_class.0,
                    label: format!("{} · {}", class_name(g.device_class), pt.subnet),
                    latency_ms: pt.latency_p50_ms,
                    quality: pt.quality,
                    devices: pt.devices,
                });
            }
        }
        let title = format!(
            "{} v{}: accuracy–latency across the fleet",
            sn.name, sn.version
        );
        charts += &format!(
            "<figure class=\"tradeoff-fig\" data-supernet-id=\"{}\"><figcaption>{}: one mark per \
             (device class, subnet) with at least k devices, at the median of their reports</figcaption>{}\
             <details><summary>Data</summary><table><thead><tr><th scope=\"col\">Class · subnet</th>\
             <th scope=\"col\">Devices</th><th scope=\"col\">Median p50</th><th scope=\"col\">Median quality</th>\
             </tr></thead><tbody>",
            sn.id,
            esc(&title),
            svg::tradeoff(&title, &marks, &classes)
        );
        for m in &marks {
            charts += &format!(
                "<tr><td class=\"mono\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.2} ms</td>\
                 <td class=\"num\">{:.3}</td></tr>",
                esc(&m.label),
                m.devices,
                m.latency_ms,
                m.quality
            );
        }
        charts += "</tbody></table></details></figure>";
    }
    if list.is_empty() {
        s += "<tr><td colspan=\"8\" class=\"empty\">No supernets yet.</td></tr>";
    }
    s += "</tbody></table></div>";
    if !charts.is_empty() {
        s += "<h3>Accuracy–latency in the fleet</h3>";
        s += &charts;
    }
    Ok(s)
}
