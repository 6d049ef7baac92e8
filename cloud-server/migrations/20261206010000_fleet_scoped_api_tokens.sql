-- Fleet-scoped API tokens: a developer or viewer token limited to one fleet (NULL: every
-- fleet). Such a token reads and writes only that fleet's devices, labels, desired state,
-- aggregates and events.
ALTER TABLE api_tokens ADD COLUMN fleet_id TEXT REFERENCES fleets (id);
