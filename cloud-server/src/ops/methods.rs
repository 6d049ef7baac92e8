//! The gRPC methods this server knows, from the services' descriptor sets: the only source of
//! metric labels (an unknown path is counted under [`UNKNOWN`], so clients cannot grow the
//! label set) and of each method's streaming kind, which decides how admission counts it.
use std::collections::HashMap;

use prost::Message;

/// The label of every path that names no known method.
pub const UNKNOWN: &str = "unknown";

/// The health check path: answered without a request slot.
pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// How a method streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One request message, one response message.
    Unary,
    /// A request stream (uploads), one response message.
    ClientStreaming,
    /// One request message, a response stream (downloads, watches).
    ServerStreaming,
    /// Streams both ways (reflection).
    Bidi,
}

impl Kind {
    /// Whether the request is a single message (its body must arrive within the body timeout).
    pub fn unary_request(self) -> bool {
        matches!(self, Kind::Unary | Kind::ServerStreaming)
    }

    /// Whether the response is a stream (held against the stream quota for its life).
    pub fn streaming_response(self) -> bool {
        matches!(self, Kind::ServerStreaming | Kind::Bidi)
    }
}

/// A known method: its path (the metric label) and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method {
    pub path: &'static str,
    pub kind: Kind,
}

/// Known methods by path.
#[derive(Debug, Default)]
pub struct MethodTable {
    by_path: HashMap<String, Method>,
}

impl MethodTable {
    /// Every method of every service in the encoded `FileDescriptorSet`s. Labels are leaked
    /// once per method so lookups hand out `&'static str` (the set is fixed at start-up).
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Self {
        let mut by_path = HashMap::new();
        for set in sets {
            let Ok(fds) = prost_types::FileDescriptorSet::decode(*set) else {
                continue;
            };
            for file in fds.file {
                let pkg = file.package.unwrap_or_default();
                for svc in file.service {
                    let svc_name = svc.name.unwrap_or_default();
                    for m in svc.method {
                        let path = if pkg.is_empty() {
                            format!("/{svc_name}/{}", m.name.unwrap_or_default())
                        } else {
                            format!("/{pkg}.{svc_name}/{}", m.name.unwrap_or_default())
                        };
                        let kind = match (
                            m.client_streaming.unwrap_or(false),
                            m.server_streaming.unwrap_or(false),
                        ) {
                            (false, false) => Kind::Unary,
                            (true, false) => Kind::ClientStreaming,
                            (false, true) => Kind::ServerStreaming,
                            (true, true) => Kind::Bidi,
                        };
                        if by_path.contains_key(&path) {
                            continue;
                        }
                        let label: &'static str = Box::leak(path.clone().into_boxed_str());
                        by_path.insert(path, Method { path: label, kind });
                    }
                }
            }
        }
        MethodTable { by_path }
    }

    /// The cloud's services, health and both reflection versions (built once per process).
    pub fn cloud() -> &'static Self {
        static TABLE: std::sync::OnceLock<MethodTable> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| {
            Self::from_descriptor_sets(&[
                adaptivenet_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ])
        })
    }

    pub fn get(&self, path: &str) -> Option<&Method> {
        self.by_path.get(path)
    }

    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_table_knows_kinds_and_nothing_else() {
        let t = MethodTable::cloud();
        let k = |p: &str| t.get(p).map(|m| m.kind);
        assert_eq!(
            k("/adaptivenet.v1.DeveloperService/UploadOracle"),
            Some(Kind::ClientStreaming)
        );
        assert_eq!(
            k("/adaptivenet.v1.DeviceService/DownloadBlob"),
            Some(Kind::ServerStreaming)
        );
        assert_eq!(
            k("/adaptivenet.v1.DeveloperService/WatchJob"),
            Some(Kind::ServerStreaming)
        );
        assert_eq!(
            k("/adaptivenet.v1.DashboardService/WatchFleet"),
            Some(Kind::ServerStreaming)
        );
        assert_eq!(k("/adaptivenet.v1.DeviceService/Report"), Some(Kind::Unary));
        assert_eq!(k(HEALTH_CHECK), Some(Kind::Unary));
        assert_eq!(
            k("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Some(Kind::Bidi)
        );
        assert_eq!(
            k("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some(Kind::Bidi)
        );
        assert_eq!(k("/adaptivenet.v1.DeviceService/Nope"), None);
        assert_eq!(k("/\"x"), None);
    }
}
