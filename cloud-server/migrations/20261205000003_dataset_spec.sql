-- Preprocessing travels with the data: the input spec and augmentation policy every consumer
-- applies, what registration recorded about the content, and the content digest of uploads.
ALTER TABLE datasets ADD COLUMN input_spec_json TEXT;
ALTER TABLE datasets ADD COLUMN augment_json TEXT;
ALTER TABLE datasets ADD COLUMN summary_json TEXT;
ALTER TABLE datasets ADD COLUMN digest TEXT;
