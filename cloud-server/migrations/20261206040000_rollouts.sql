-- Staged rollouts: a fleet moves from supernet A to B in cohort steps with metric gates.
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    fleet_id TEXT NOT NULL REFERENCES fleets(id),
    -- The fleet's id while the rollout is running or paused, NULL once it settles: at most
    -- one active rollout per fleet (NULLs never collide in a UNIQUE column).
    active_fleet_id TEXT UNIQUE,
    from_supernet_id TEXT NOT NULL REFERENCES supernets(id),
    to_supernet_id TEXT NOT NULL REFERENCES supernets(id),
    steps_json TEXT NOT NULL,
    gates_json TEXT NOT NULL,
    step_index BIGINT NOT NULL,
    step_started_ms BIGINT NOT NULL,
    state TEXT NOT NULL,
    status TEXT NOT NULL,
    -- The replica deciding for this rollout (same lease scheme as jobs).
    lease_owner TEXT,
    lease_expires_ms BIGINT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX rollouts_fleet ON rollouts (fleet_id, created_ms);
CREATE INDEX rollouts_state ON rollouts (state);

-- Every decision with the numbers that caused it.
CREATE TABLE rollout_decisions (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    step_index BIGINT NOT NULL,
    action TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    PRIMARY KEY (rollout_id, seq)
);
