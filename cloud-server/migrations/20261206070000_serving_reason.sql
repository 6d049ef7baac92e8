-- What agents say about the supernet they serve: why (label, pinned, rollout cohort or
-- control, rolled back, install failed), and a supernet they could not serve. Rollout gates
-- count a cohort device's failed install of B as a failure.
ALTER TABLE devices ADD COLUMN serving_reason BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN failed_supernet_id TEXT;
ALTER TABLE devices ADD COLUMN install_failure BIGINT NOT NULL DEFAULT 0;
-- Crash loops: the agent's process start time from heartbeats; a new one is a restart,
-- counted while restarts come less than 10 minutes apart.
ALTER TABLE devices ADD COLUMN agent_started_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN recent_restarts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN last_restart_ms BIGINT NOT NULL DEFAULT 0;
