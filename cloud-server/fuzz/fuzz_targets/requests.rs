//! Every request message of the cloud's services, decoded from arbitrary bytes with prost
//! and run through the same domain validation and conversion the handlers apply before
//! touching the store: errors are fine, panics are bugs. The first byte picks the type.
#![no_main]
use adaptivenet_cloud::api::{convert, device::report_from_pb};
use adaptivenet_cloud::domain::{
    check_name, check_sha256, check_subnet_code, check_version_string, parse_id, AdaptationReason,
    DeviceClass, Heartbeat, Page,
};
use adaptivenet_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn page(p: &Option<pb::PageRequest>) {
    if let Some(p) = p {
        if let Ok(pg) = Page::new(p.page_size, &p.page_token) {
            let _ = pg.next_token(0);
        }
    }
}

fn id(field: &str, s: &str) {
    if !s.is_empty() {
        let _ = parse_id(field, s);
    }
}

macro_rules! decode {
    ($t:ty, $data:expr) => {
        match <$t>::decode($data) {
            Ok(m) => m,
            Err(_) => return,
        }
    };
}

fn check(kind: u8, data: &[u8]) {
    match kind % 30 {
        0 => {
            let m = decode!(pb::UploadOracleRequest, data);
            if let Some(pb::upload_oracle_request::Msg::Header(h)) = m.msg {
                let _ = check_name("header.name", &h.name);
                let _ = check_sha256("header.weights_sha256", &h.weights_sha256);
                let _ = adaptivenet_core::model::ArchDescriptor::from_json(&h.arch_json);
            }
        }
        1 => page(&decode!(pb::ListOraclesRequest, data).page),
        2 => id("oracle_id", &decode!(pb::GetOracleRequest, data).oracle_id),
        3 => id(
            "oracle_id",
            &decode!(pb::DeleteOracleRequest, data).oracle_id,
        ),
        4 => {
            let m = decode!(pb::RegisterDatasetRequest, data);
            let _ = check_name("name", &m.name);
        }
        5 => page(&decode!(pb::ListDatasetsRequest, data).page),
        6 => {
            let m = decode!(pb::StartElastificationRequest, data);
            id("oracle_id", &m.oracle_id);
            id("dataset_id", &m.dataset_id);
            if !m.supernet_name.is_empty() {
                let _ = check_name("supernet_name", &m.supernet_name);
            }
            let _ = serde_json::from_str::<serde_json::Value>(&m.params_json);
        }
        7 => id("job_id", &decode!(pb::GetJobRequest, data).job_id),
        8 => id("job_id", &decode!(pb::WatchJobRequest, data).job_id),
        9 => id("job_id", &decode!(pb::CancelJobRequest, data).job_id),
        10 => {
            let m = decode!(pb::ListJobsRequest, data);
            page(&m.page);
            if let Ok(s) = pb::JobState::try_from(m.state) {
                let _ = convert::job_state_from_pb(s);
            }
        }
        11 => {
            let m = decode!(pb::ListSupernetsRequest, data);
            page(&m.page);
            if !m.name.is_empty() {
                let _ = check_name("name", &m.name);
            }
        }
        12 => id(
            "supernet_id",
            &decode!(pb::GetSupernetRequest, data).supernet_id,
        ),
        13 => {
            let m = decode!(pb::PublishSupernetRequest, data);
            id("supernet_id", &m.supernet_id);
            id("fleet_id", &m.fleet_id);
            let _ = check_name("label", &m.label);
        }
        14 => {
            let m = decode!(pb::SetDesiredStateRequest, data);
            id("fleet_id", &m.fleet_id);
            match &m.target {
                Some(pb::set_desired_state_request::Target::Label(l)) => {
                    let _ = check_name("label", l);
                }
                Some(pb::set_desired_state_request::Target::SupernetId(s)) => id("supernet_id", s),
                None => {}
            }
            let _ = convert::budget_from_pb(m.budget.as_ref()).validate();
        }
        15 => {
            let m = decode!(pb::EnrollRequest, data);
            let _ = DeviceClass::new("device_class", m.device_class);
            let _ = check_version_string("agent_version", &m.agent_version);
        }
        16 => id(
            "supernet_id",
            &decode!(pb::GetManifestRequest, data).supernet_id,
        ),
        17 => {
            let m = decode!(pb::DownloadBlobRequest, data);
            let _ = check_sha256("sha256", &m.sha256);
        }
        18 => {
            let r = decode!(pb::HeartbeatRequest, data);
            let active_supernet_id = if r.active_supernet_id.is_empty() {
                None
            } else {
                parse_id("active_supernet_id", &r.active_supernet_id).ok()
            };
            let Ok(last_reason) =
                AdaptationReason::new("last_adaptation_reason", r.last_adaptation_reason)
            else {
                return;
            };
            let _ = check_subnet_code("active_subnet", &r.active_subnet);
            let hb = Heartbeat {
                agent_version: r.agent_version,
                active_supernet_id,
                active_subnet: r.active_subnet,
                latency_p50_ms: r.latency_p50_ms,
                latency_p95_ms: r.latency_p95_ms,
                last_reason,
                applied_generation: r.applied_generation,
                serving_reason: Default::default(),
                failed_supernet_id: None,
                install_failure: Default::default(),
                agent_started_ms: 0,
            };
            let _ = hb.validate();
        }
        19 => {
            let m = decode!(pb::ReportRequest, data);
            if let Ok(r) = report_from_pb(&m) {
                let _ = r.validate(100);
                let _ = r.validate(0);
            }
        }
        20 => page(&decode!(pb::ListFleetsRequest, data).page),
        21 => {
            let m = decode!(pb::ListDevicesRequest, data);
            page(&m.page);
            id("fleet_id", &m.fleet_id);
        }
        22 => page(&decode!(pb::ListSupernetsForDashboardRequest, data).page),
        23 => page(&decode!(pb::ListJobsForDashboardRequest, data).page),
        24 => id(
            "fleet_id",
            &decode!(pb::GetFleetAggregatesRequest, data).fleet_id,
        ),
        25 => {
            let _ = decode!(pb::WatchFleetRequest, data);
        }
        26 => {
            let m = decode!(pb::CreateFleetRequest, data);
            let _ = check_name("name", &m.name);
        }
        27 => {
            let m = decode!(pb::CreateEnrollmentTokenRequest, data);
            id("fleet_id", &m.fleet_id);
            let _ = std::time::Duration::from_secs(m.ttl_seconds).as_millis();
        }
        28 => {
            let m = decode!(pb::CreateApiTokenRequest, data);
            let _ = pb::Role::try_from(m.role);
        }
        _ => {
            id("token_id", &decode!(pb::RevokeTokenRequest, data).token_id);
            id(
                "device_id",
                &decode!(pb::RevokeDeviceRequest, data).device_id,
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some((&kind, rest)) = data.split_first() {
        check(kind, rest);
    }
});
