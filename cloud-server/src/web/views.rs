//! The console's views, rendered as HTML fragments from the same authorization helpers and
//! read functions as `DashboardService` and the developer read methods. Every value is
//! escaped; numbers an operator compares with the API carry it in `data-value`.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use tonic::metadata::MetadataMap;
use uuid::Uuid;

use super::{esc, svg};
use crate::api::dashboard::{aggregates_for, devices_for};
use crate::api::{management, management_fleet};
use crate::app::App;
use crate::auth::Access;
use crate::domain::{
    now_ms, AdaptationReason, AggregateGroup, DeviceClass, Distribution, FleetAggregates, Page,
    Role,
};
use crate::error::Result;
use crate::rollout::Step;

/// Which distribution of a group a chart shows.
type Pick = fn(&AggregateGroup) -> Distribution;

/// Rows a list view shows (the store's largest page).
const LIST_LIMIT: u32 = 1000;

pub fn class_name(c: DeviceClass) -> &'static str {
    match c.0 {
        1 => "cpu-small",
        2 => "cpu-large",
        3 => "gpu-embedded",
        4 => "gpu-server",
        5 => "mobile",
        _ => "unspecified",
    }
}

fn reason_name(r: AdaptationReason) -> &'static str {
    match r.0 {
        1 => "initial",
        2 => "over budget",
        3 => "slack",
        4 => "new supernet",
        5 => "budget changed",
        6 => "re-search",
        _ => "none yet",
    }
}

/// `2026-12-06 07:20:01 UTC` (civil date from days since the epoch, proleptic Gregorian).
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let s = (now_ms() - ms).max(0) / 1000;
    let rel = match s {
        0..=59 => format!("{s} s ago"),
        60..=3599 => format!("{} min ago", s / 60),
        3600..=86_399 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    };
    format!("<time title=\"{}\">{rel}</time>", utc(ms))
}

fn pct(f: f64) -> String {
    format!("{:.0} %", 100.0 * f)
}

fn short(id: Uuid) -> String {
    id.simple().to_string()[..8].to_string()
}

/// `name vN` of each supernet id (unknown ids by their short form).
async fn supernet_names(app: &App, ids: Vec<Uuid>) -> Result<HashMap<Uuid, String>> {
    let mut out = HashMap::new();
    for id in ids {
        if let std::collections::hash_map::Entry::Vacant(e) = out.entry(id) {
            let name = match app.store().get_supernet(id).await {
                Ok(s) => format!("{} v{}", s.name, s.version),
                Err(_) => short(id),
            };
            e.insert(name);
        }
    }
    Ok(out)
}

/// The principal's role, fleet scope and the fleets it may pick (JSON).
pub async fn session(app: &App, md: &MetadataMap) -> Result<String> {
    let (p, scope) = management_fleet(app, md, Access::Read, || Ok(None)).await?;
    let fleets = match scope {
        Some(f) => vec![app.store().get_fleet(f).await?],
        None => app.store().list_fleets(Page::new(LIST_LIMIT, "")?).await?,
    };
    let v = serde_json::json!({
        "role": p.role().as_str(),
        "fleet_scope": scope.map(|f| f.to_string()),
        "min_group_devices": app.config().min_group_devices.max(1),
        "fleets": fleets.iter().map(|f| serde_json::json!({
            "id": f.id.to_string(), "name": f.name,
        })).collect::<Vec<_>>(),
    });
    Ok(v.to_string())
}

/// Device-weighted share of the shown groups (None without groups).
pub fn weighted(a: &FleetAggregates, f: impl Fn(&AggregateGroup) -> f64) -> Option<f64> {
    let n: u32 = a.groups.iter().map(|g| g.devices).sum();
    (n > 0).then(|| {
        a.groups
            .iter()
            .map(|g| f(g) * g.devices as f64)
            .sum::<f64>()
            / n as f64
    })
}

fn stat(id: &str, label: &str, value: String, shown: String) -> String {
    format!(
        "<div class=\"stat\"><dt>{label}</dt><dd id=\"{id}\" data-value=\"{}\">{}</dd></div>",
        esc(&value),
        esc(&shown)
    )
}

fn floor_note(a: &FleetAggregates, k: u32) -> String {
    format!(
        "<p class=\"note\">Aggregates over groups (supernet × device class) of at least \
         {k} devices; extremes only from 2×{k}. {} group(s) with {} device(s) below that are \
         counted, not shown.</p>",
        a.suppressed_groups, a.suppressed_devices
    )
}

fn group_label(g: &AggregateGroup, names: &HashMap<Uuid, String>) -> String {
    format!(
        "{} · {}",
        names.get(&g.supernet_id).cloned().unwrap_or_default(),
        class_name(g.device_class)
    )
}

/// Fleet overview: device counts, the within-budget shares by p50 and p95 side by side,
/// distributions of latency and quality, subnets in use.
pub async fn overview(app: &App, md: &MetadataMap, fleet: Option<Uuid>) -> Result<String> {
    let (p, fleet) = management_fleet(app, md, Access::Read, || Ok(fleet)).await?;
    let a = aggregates_for(app, &p, fleet).await?;
    let k = app.config().min_group_devices.max(1);
    let names = supernet_names(app, a.groups.iter().map(|g| g.supernet_id).collect()).await?;
    let share = |id: &str, label: &str, v: Option<f64>| match v {
        Some(v) => stat(id, label, format!("{v:.6}"), pct(v)),
        None => stat(id, label, String::new(), "—".into()),
    };
    let mut s = String::from("<h2 id=\"view-title\">Fleet overview</h2><dl class=\"stats\">");
    s += &stat(
        "devices-total",
        "Devices",
        a.devices_total.to_string(),
        a.devices_total.to_string(),
    );
    s += &stat(
        "devices-online",
        "Online",
        a.devices_online.to_string(),
        a.devices_online.to_string(),
    );
    s += &stat(
        "devices-stale",
        "Stale",
        a.devices_stale.to_string(),
        a.devices_stale.to_string(),
    );
    s += &share(
        "within-p50",
        "Within budget by p50",
        weighted(&a, |g| g.within_budget_p50_fraction),
    );
    s += &share(
        "within-p95",
        "Within budget by p95",
        weighted(&a, |g| g.within_budget_fraction),
    );
    s += "</dl>";
    s += &floor_note(&a, k);
    if a.groups.is_empty() {
        s += "<p class=\"empty\">No group has reached the privacy floor yet.</p>";
        return Ok(s);
    }
    s += &groups_table(&a, &names);
    s += "<h3>Distributions</h3><div class=\"charts\">";
    let charts: [(&str, &str, Pick); 3] = [
        ("Latency p50 (ms)", "ms", |g| g.latency_p50_ms),
        ("Latency p95 (ms)", "ms", |g| g.latency_p95_ms),
        ("Quality", "", |g| g.quality),
    ];
    for (title, unit, f) in charts {
        let rows: Vec<_> = a
            .groups
            .iter()
            .map(|g| (group_label(g, &names), f(g)))
            .collect();
        s += &format!(
            "<figure><figcaption>{title}: min–max, median–p90 box, mean dot</figcaption>{}</figure>",
            svg::distributions(title, unit, &rows)
        );
    }
    s += "</div><h3>Subnets in use</h3>";
    let mut subnets: Vec<(String, u32)> = Vec::new();
    let mut table = String::from(
        "<table id=\"subnets\"><thead><tr><th scope=\"col\">Subnet</th>\
         <th scope=\"col\">Supernet · class</th><th scope=\"col\">Devices</th></tr></thead><tbody>",
    );
    for g in &a.groups {
        for (code, n) in &g.subnets {
            table += &format!(
                "<tr><td class=\"mono\">{}</td><td>{}</td><td class=\"num\">{n}</td></tr>",
                esc(code),
                esc(&group_label(g, &names))
            );
            subnets.push((code.clone(), *n));
        }
    }
    subnets.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
    subnets.truncate(12);
    s += &format!(
        "<figure>{}</figure>{table}</tbody></table>",
        svg::bars("Devices per subnet", &subnets)
    );
    Ok(s)
}

fn groups_table(a: &FleetAggregates, names: &HashMap<Uuid, String>) -> String {
    let mut s = String::from(
        "<table id=\"groups\"><caption>By group</caption><thead><tr>\
         <th scope=\"col\">Supernet</th><th scope=\"col\">Class</th>\
         <th scope=\"col\">Devices</th><th scope=\"col\">Within budget by p50</th>\
         <th scope=\"col\">Within budget by p95</th><th scope=\"col\">Median p50</th>\
         <th scope=\"col\">Median p95</th><th scope=\"col\">Median quality</th></tr></thead><tbody>",
    );
    for g in &a.groups {
        s += &format!(
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{:.2} ms</td><td class=\"num\">{:.2} ms</td>\
             <td class=\"num\">{:.3}</td></tr>",
            esc(names.get(&g.supernet_id).map_or("", String::as_str)),
            class_name(g.device_class),
            g.devices,
            pct(g.within_budget_p50_fraction),
            pct(g.within_budget_fraction),
            g.latency_p50_ms.p50,
            g.latency_p95_ms.p50,
            g.quality.p50
        );
    }
    s + "</tbody></table>"
}

/// Devices as `ListDevices` returns them to this principal (viewers: no per-device latency),
/// p50 and p95 against the fleet's budget, and why each last adapted.
pub async fn devices(app: &App, md: &MetadataMap, fleet: Option<Uuid>) -> Result<String> {
    let (p, fleet) = management_fleet(app, md, Access::Read, || Ok(fleet)).await?;
    let list = devices_for(app, &p, Page::new(LIST_LIMIT, "")?, fleet).await?;
    let viewer = p.role() == Role::Viewer;
    let names = supernet_names(
        app,
        list.iter().filter_map(|d| d.active_supernet_id).collect(),
    )
    .await?;
    let mut budgets: HashMap<Uuid, f64> = HashMap::new();
    for f in list.iter().map(|d| d.fleet_id).collect::<BTreeSet<_>>() {
        let b = app.store().desired_state(f).await?.budget;
        budgets.insert(f, b.latency_budget_ms);
    }
    let mut reasons: BTreeMap<&str, u32> = BTreeMap::new();
    for d in &list {
        *reasons.entry(reason_name(d.last_reason)).or_default() += 1;
    }
    let mut s = String::from("<h2 id=\"view-title\">Devices</h2>");
    if viewer {
        s += "<p class=\"note\">Viewer tokens see no per-device latency: it would single a \
              device out of the aggregates. The overview has the fleet's distributions.</p>";
    }
    s += "<h3>Recent adaptation reasons</h3><table id=\"reasons\"><thead><tr>\
          <th scope=\"col\">Last adaptation</th><th scope=\"col\">Devices</th></tr></thead><tbody>";
    for (r, n) in &reasons {
        s += &format!("<tr><td>{r}</td><td class=\"num\">{n}</td></tr>");
    }
    s += "</tbody></table>";
    s += &format!(
        "<h3>All devices ({})</h3><div class=\"scroll\"><table id=\"devices\"><thead><tr>\
         <th scope=\"col\">Device</th><th scope=\"col\">Class</th><th scope=\"col\">Agent</th>\
         <th scope=\"col\">Supernet</th><th scope=\"col\">Subnet</th><th scope=\"col\">Status</th>\
         <th scope=\"col\">Last seen</th><th scope=\"col\">p50 / budget</th>\
         <th scope=\"col\">p95 / budget</th><th scope=\"col\">Last adaptation</th></tr></thead><tbody>",
        list.len()
    );
    for d in &list {
        let budget = budgets.get(&d.fleet_id).copied().unwrap_or(0.0);
        let vs = |v: f64| {
            if viewer {
                "<td class=\"withheld\">withheld</td>".to_string()
            } else if v <= 0.0 {
                "<td class=\"num\">—</td>".to_string()
            } else if budget <= 0.0 {
                format!("<td class=\"num\">{v:.2} ms</td>")
            } else {
                let ok = v <= budget;
                format!(
                    "<td class=\"num {}\">{v:.2} / {budget:.0} ms {}</td>",
                    if ok { "ok" } else { "over" },
                    if ok { "✓" } else { "over" }
                )
            }
        };
        s += &format!(
            "<tr data-device-id=\"{}\"><td class=\"mono\" title=\"{}\">{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"st-{}\">{}</td>\
             <td>{}</td>{}{}<td>{}</td></tr>",
            d.id,
            d.id,
            short(d.id),
            class_name(d.device_class),
            esc(&d.agent_version),
            esc(&d
                .active_supernet_id
                .and_then(|i| names.get(&i).cloned())
                .unwrap_or_else(|| "—".into())),
            esc(if d.active_subnet.is_empty() {
                "—"
            } else {
                &d.active_subnet
            }),
            d.status.as_str(),
            d.status.as_str(),
            ago(d.last_heartbeat_ms),
            vs(d.latency_p50_ms),
            vs(d.latency_p95_ms),
            reason_name(d.last_reason)
        );
    }
    s += "</tbody></table></div>";
    Ok(s)
}

/// Jobs, newest first, each row updated in place by the event stream (`events`).
pub async fn jobs(app: &App, md: &MetadataMap) -> Result<String> {
    management(app, md, Access::Read).await?;
    let list = app.store().recent_jobs(LIST_LIMIT).await?;
    let mut s = String::from(
        "<h2 id=\"view-title\">Jobs</h2><p class=\"note\" id=\"jobs-live\" aria-live=\"polite\">\
         Progress streams in while this page is open.</p><div class=\"scroll\"><table id=\"jobs\">\
         <thead><tr><th scope=\"col\">Job</th><th scope=\"col\">Kind</th><th scope=\"col\">Name</th>\
         <th scope=\"col\">State</th><th scope=\"col\">Stage</th><th scope=\"col\">Progress</th>\
         <th scope=\"col\">Attempts</th><th scope=\"col\">Created</th><th scope=\"col\">Error</th>\
         </tr></thead><tbody>",
    );
    for j in &list {
        s += &format!(
            "<tr data-job-id=\"{}\"><td class=\"mono\" title=\"{}\">{}</td><td>{}</td><td>{}</td>\
             <td data-field=\"state\" class=\"js-{}\">{}</td><td data-field=\"stage\">{}</td>\
             <td><progress max=\"1\" value=\"{:.4}\" aria-label=\"progress of job {}\"></progress> \
             <span data-field=\"progress\" data-value=\"{:.4}\">{:.1} %</span></td>\
             <td class=\"num\">{}/{}</td><td>{}</td><td>{}</td></tr>",
            j.id,
            j.id,
            short(j.id),
            j.kind.as_str(),
            esc(&j.supernet_name),
            j.state.as_str(),
            j.state.as_str(),
            esc(&j.stage),
            j.progress,
            short(j.id),
            j.progress,
            100.0 * j.progress,
            j.attempts,
            j.max_attempts,
            ago(j.created_ms),
            esc(j.error.as_deref().unwrap_or(""))
        );
    }
    if list.is_empty() {
        s += "<tr><td colspan=\"9\" class=\"empty\">No jobs yet.</td></tr>";
    }
    s += "</tbody></table></div>";
    Ok(s)
}

fn step_name(step: &Step) -> String {
    match step {
        Step::Percent(p) => format!("{p} %"),
        Step::Devices(d) => format!("{} canary device(s)", d.len()),
        Step::Class(c) => format!("class {}", class_name(DeviceClass(*c))),
    }
}

/// Rollouts (of the fleet, or every fleet the token may read), with their stored decisions.
pub async fn rollouts(app: &App, md: &MetadataMap, fleet: Option<Uuid>) -> Result<String> {
    let (_, fleet) = management_fleet(app, md, Access::Read, || Ok(fleet)).await?;
    let list = app.store().list_rollouts(fleet).await?;
    let names = supernet_names(
        app,
        list.iter()
            .flat_map(|(r, _)| [r.from_supernet_id, r.to_supernet_id])
            .collect(),
    )
    .await?;
    let mut fleets: HashMap<Uuid, String> = HashMap::new();
    for f in list
        .iter()
        .map(|(r, _)| r.fleet_id)
        .collect::<BTreeSet<_>>()
    {
        fleets.insert(f, app.store().get_fleet(f).await?.name);
    }
    let mut s = String::from("<h2 id=\"view-title\">Rollouts</h2>");
    if list.is_empty() {
        s += "<p class=\"empty\">No rollouts.</p>";
        return Ok(s);
    }
    for (r, decisions) in &list {
        let steps: Vec<String> = r.steps.iter().map(step_name).collect();
        s += &format!(
            "<article class=\"rollout\" data-rollout-id=\"{}\"><h3>{} → {} <span class=\"badge rs-{}\">{}</span></h3>\
             <dl class=\"kv\"><dt>Fleet</dt><dd>{}</dd><dt>Step</dt><dd>{} of {}: {}</dd>\
             <dt>Steps</dt><dd>{}</dd><dt>Status</dt><dd>{}</dd><dt>Updated</dt><dd>{}</dd></dl>",
            r.id,
            esc(&names[&r.from_supernet_id]),
            esc(&names[&r.to_supernet_id]),
            r.state.as_str(),
            r.state.as_str(),
            esc(&fleets[&r.fleet_id]),
            r.step_index + 1,
            r.steps.len(),
            esc(steps.get(r.step_index).map_or("", String::as_str)),
            esc(&steps.join(" → ")),
            esc(&r.status),
            ago(r.updated_ms)
        );
        s += &format!(
            "<details><summary>Decisions ({})</summary><ol class=\"decisions\">",
            decisions.len()
        );
        for d in decisions {
            s += &format!(
                "<li><time>{}</time> step {}: <strong>{}</strong> <code>{}</code></li>",
                utc(d.at_ms),
                d.step_index + 1,
                esc(&d.action),
                esc(&d.detail.to_string())
            );
        }
        s += "</ol></details></article>";
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_541_601_000), "2026-12-06 07:20:01 UTC");
    }
}
