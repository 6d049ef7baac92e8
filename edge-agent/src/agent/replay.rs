//! The replay task: the device's own data, batch by batch in a loop, as request traffic, so
//! the latency window and the controller see a workload without an external client. Runs
//! on the blocking pool and checks the cancellation token between batches.
use adaptivenet_core::data::{Dataset, Transform};

use super::Agent;
use crate::Result;

/// Local data to replay and the transform to the model's input.
#[derive(Debug)]
pub struct Replay {
    pub data: Dataset,
    pub transform: Transform,
    /// Images per request.
    pub batch: usize,
}

/// Serves batches until the agent is cancelled; returns the images served.
pub(super) fn run(agent: &Agent) -> Result<usize> {
    let Some(r) = &agent.cfg.replay else {
        return Ok(0);
    };
    let batch = r.batch.max(1);
    let (mut served, mut i) = (0usize, 0usize);
    while !agent.cancel.is_cancelled() {
        let idx: Vec<usize> = (0..batch).map(|k| (i + k) % r.data.len()).collect();
        i += batch;
        let (x, _) = r
            .data
            .batch_tensor(&idx, &r.transform, &candle_core::Device::Cpu)?;
        agent.server.infer(&x)?;
        served += batch;
    }
    Ok(served)
}
