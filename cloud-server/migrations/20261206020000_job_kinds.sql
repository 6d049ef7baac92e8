-- Jobs have kinds: 'elastify' (an oracle becomes a supernet) and 'train_oracle' (an oracle is
-- trained on a dataset, from scratch from `arch_json` or fine-tuned from `oracle_id`, and the
-- result stored as a new oracle `result_oracle_id`, with a readable `report_json`).
-- Training from scratch has no input oracle, so `oracle_id` becomes nullable. SQLite cannot
-- drop NOT NULL in place, so the table is rebuilt; the same statements run on PostgreSQL.
CREATE TABLE jobs_v2 (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    oracle_id TEXT REFERENCES oracles(id),
    dataset_id TEXT REFERENCES datasets(id),
    supernet_name TEXT NOT NULL,
    params_json TEXT NOT NULL,
    arch_json TEXT,
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
    result_oracle_id TEXT,
    report_json TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
INSERT INTO jobs_v2 (id, kind, oracle_id, dataset_id, supernet_name, params_json, arch_json,
    state, stage, progress, attempts, max_attempts, cancel_requested, lease_owner,
    lease_expires_ms, checkpoint_sha256, error, supernet_id, result_oracle_id, report_json,
    created_ms, updated_ms)
SELECT id, 'elastify', oracle_id, dataset_id, supernet_name, params_json, NULL,
    state, stage, progress, attempts, max_attempts, cancel_requested, lease_owner,
    lease_expires_ms, checkpoint_sha256, error, supernet_id, NULL, NULL,
    created_ms, updated_ms
FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_v2 RENAME TO jobs;
CREATE INDEX jobs_state_created ON jobs (state, created_ms);
