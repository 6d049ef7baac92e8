//! Operations: metrics, the request layer (admission, quotas, timeouts, request metrics),
//! the method table metric labels come from, the network limits, the metrics HTTP endpoint
//! the shutdown sequence and the gRPC-Web gate.
pub mod layer;
pub mod methods;
pub mod metrics;
pub mod net;
pub mod web;
