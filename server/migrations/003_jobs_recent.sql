-- The operators' jobs view lists the latest jobs of every group.
CREATE INDEX IF NOT EXISTS jobs_recent ON jobs (created_at DESC);
