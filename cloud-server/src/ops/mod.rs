//! Operations: metrics, the request layer (load shedding + request metrics), the metrics
//! HTTP endpoint and the shutdown sequence.
pub mod layer;
pub mod metrics;
