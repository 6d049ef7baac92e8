-- One dataset per content digest: concurrent identical uploads converge on one row.
CREATE UNIQUE INDEX datasets_digest_unique ON datasets (digest);
