//! Fleet commands: desired state, publishing a supernet under a label, and the dashboard's
//! aggregates.
use adaptivenet_proto::v1 as pb;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

use super::Client;

pub(super) async fn desire(
    c: &mut Client,
    fleet: String,
    label: String,
    supernet: Option<String>,
    budget_fraction: f64,
    hysteresis: f64,
) -> anyhow::Result<()> {
    use pb::set_desired_state_request::Target;
    let target = match supernet {
        Some(id) => Target::SupernetId(id),
        None => Target::Label(label),
    };
    let d = c
        .set_desired_state(pb::SetDesiredStateRequest {
            fleet_id: fleet,
            target: Some(target),
            budget: Some(pb::LatencyBudgetPolicy {
                latency_budget_ms: 0.0,
                budget_fraction,
                hysteresis,
            }),
        })
        .await?
        .into_inner();
    println!(
        "fleet {} -> supernet {} (generation {})",
        d.fleet_id, d.supernet_id, d.generation
    );
    Ok(())
}

pub(super) async fn publish(
    c: &mut Client,
    supernet_id: String,
    fleet: String,
    label: String,
) -> anyhow::Result<()> {
    let l = c
        .publish_supernet(pb::PublishSupernetRequest {
            supernet_id,
            fleet_id: fleet,
            label,
        })
        .await?
        .into_inner();
    println!("{} -> {} in fleet {}", l.label, l.supernet_id, l.fleet_id);
    Ok(())
}

/// Aggregates come from the dashboard service, over a channel of their own.
pub(super) async fn aggregates(ep: Endpoint, token: &str, fleet: String) -> anyhow::Result<()> {
    let channel = ep.connect().await?;
    let value: MetadataValue<_> = format!("Bearer {token}").parse()?;
    let mut d =
        adaptivenet_proto::v1::dashboard_service_client::DashboardServiceClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", value.clone());
                Ok(req)
            },
        );
    let a = d
        .get_fleet_aggregates(pb::GetFleetAggregatesRequest { fleet_id: fleet })
        .await?
        .into_inner();
    println!(
        "devices: {} total, {} online, {} stale",
        a.devices_total, a.devices_online, a.devices_stale
    );
    if a.suppressed_groups > 0 {
        println!(
            "suppressed (below the privacy floor): {} groups, {} devices",
            a.suppressed_groups, a.suppressed_devices
        );
    }
    for g in a.groups {
        let dist = |d: Option<pb::Distribution>| {
            d.map(|d| {
                if d.extremes_suppressed {
                    format!("p50 {:.3} mean {:.3}", d.p50, d.mean)
                } else {
                    format!(
                        "p50 {:.3} p90 {:.3} (min {:.3}, max {:.3})",
                        d.p50, d.p90, d.min, d.max
                    )
                }
            })
            .unwrap_or_default()
        };
        println!(
            "supernet {} class {:?}: {} devices, within budget {:.0}% by p50, {:.0}% by p95",
            g.supernet_id,
            pb::DeviceClass::try_from(g.device_class).unwrap_or_default(),
            g.devices,
            100.0 * g.within_budget_p50_fraction,
            100.0 * g.within_budget_fraction
        );
        println!("  latency p50 ms: {}", dist(g.latency_p50_ms));
        println!("  latency p95 ms: {}", dist(g.latency_p95_ms));
        println!("  quality:        {}", dist(g.quality));
        for sc in g.subnets {
            println!("  subnet {:24} x{}", sc.subnet, sc.devices);
        }
    }
    Ok(())
}
