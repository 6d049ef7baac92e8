-- adaptivenet cloud schema, version 1. One script for SQLite and PostgreSQL: only TEXT,
-- BIGINT and DOUBLE PRECISION columns; ids are UUID strings, times Unix milliseconds,
-- flags 0/1.
CREATE TABLE oracles (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    family TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL UNIQUE,
    size_bytes BIGINT NOT NULL,
    num_params BIGINT NOT NULL,
    num_tensors BIGINT NOT NULL,
    arch_json TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE datasets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    uri TEXT NOT NULL,
    format TEXT NOT NULL,
    num_samples BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    oracle_id TEXT NOT NULL REFERENCES oracles(id),
    dataset_id TEXT REFERENCES datasets(id),
    supernet_name TEXT NOT NULL,
    params_json TEXT NOT NULL,
    state TEXT NOT NULL,
    stage TEXT NOT NULL,
    progress DOUBLE PRECISION NOT NULL,
    attempts BIGINT NOT NULL,
    max_attempts BIGINT NOT NULL,
    cancel_requested BIGINT NOT NULL,
    lease_owner TEXT,
    lease_expires_ms BIGINT,
    checkpoint_sha256 TEXT,
    error TEXT,
    supernet_id TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX jobs_state_created ON jobs (state, created_ms);

CREATE TABLE supernets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    oracle_id TEXT NOT NULL REFERENCES oracles(id),
    job_id TEXT,
    manifest_json TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    num_modules BIGINT NOT NULL,
    total_bytes BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    UNIQUE (name, version)
);

CREATE TABLE supernet_blobs (
    supernet_id TEXT NOT NULL REFERENCES supernets(id),
    sha256 TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    PRIMARY KEY (supernet_id, sha256)
);
CREATE INDEX supernet_blobs_sha256 ON supernet_blobs (sha256);

CREATE TABLE fleets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    desired_label TEXT,
    desired_supernet_id TEXT REFERENCES supernets(id),
    budget_ms DOUBLE PRECISION NOT NULL,
    budget_fraction DOUBLE PRECISION NOT NULL,
    hysteresis DOUBLE PRECISION NOT NULL,
    generation BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE fleet_labels (
    fleet_id TEXT NOT NULL REFERENCES fleets(id),
    label TEXT NOT NULL,
    supernet_id TEXT NOT NULL REFERENCES supernets(id),
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (fleet_id, label)
);

CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    fleet_id TEXT NOT NULL REFERENCES fleets(id),
    token_hash TEXT NOT NULL UNIQUE,
    uses_left BIGINT NOT NULL,
    expires_ms BIGINT,
    revoked BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL,
    expires_ms BIGINT,
    revoked BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    fleet_id TEXT NOT NULL REFERENCES fleets(id),
    credential_hash TEXT NOT NULL UNIQUE,
    credential_expires_ms BIGINT,
    device_class BIGINT NOT NULL,
    status TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    active_supernet_id TEXT,
    active_subnet TEXT NOT NULL,
    latency_p50_ms DOUBLE PRECISION NOT NULL,
    latency_p95_ms DOUBLE PRECISION NOT NULL,
    last_reason BIGINT NOT NULL,
    applied_generation BIGINT NOT NULL,
    enrolled_ms BIGINT NOT NULL,
    last_heartbeat_ms BIGINT NOT NULL
);
CREATE INDEX devices_fleet ON devices (fleet_id);

-- Latest aggregate report per device (the closed Report schema, nothing per-sample).
CREATE TABLE device_reports (
    device_id TEXT PRIMARY KEY REFERENCES devices(id),
    fleet_id TEXT NOT NULL,
    supernet_id TEXT NOT NULL,
    device_class BIGINT NOT NULL,
    active_subnet TEXT NOT NULL,
    latency_p50_ms DOUBLE PRECISION NOT NULL,
    latency_p95_ms DOUBLE PRECISION NOT NULL,
    latency_budget_ms DOUBLE PRECISION NOT NULL,
    quality DOUBLE PRECISION NOT NULL,
    quality_samples BIGINT NOT NULL,
    search_generations BIGINT NOT NULL,
    search_evaluated BIGINT NOT NULL,
    search_seconds DOUBLE PRECISION NOT NULL,
    front_size BIGINT NOT NULL,
    lt_entries BIGINT NOT NULL,
    lt_stem_ms DOUBLE PRECISION NOT NULL,
    lt_head_ms DOUBLE PRECISION NOT NULL,
    lt_oracle_ms DOUBLE PRECISION NOT NULL,
    lt_calibration DOUBLE PRECISION NOT NULL,
    report_count BIGINT NOT NULL,
    reported_ms BIGINT NOT NULL
);
CREATE INDEX device_reports_fleet ON device_reports (fleet_id);
