//! Operations: metrics, the request layer (admission, quotas, timeouts, request metrics),
//! the method table metric labels come from, the network limits, the metrics HTTP endpoint
//! and the shutdown sequence.
pub mod layer;
pub mod methods;
pub mod metrics;
pub mod net;
