-- What lets the hot writes take one round trip each: the sort-rate counter lives beside the jobs
-- it limits, and a claimed job's frame can be written by the statement that claims it.

-- Sorts per user per minute (PROTOCOL.md §4), counted inside the enqueue statement. UNLOGGED: a
-- refused sort writes no WAL and waits for no flush, and losing the counts in a crash only
-- forgives a minute of them. Old windows are pruned by the workers' sweep.
CREATE UNLOGGED TABLE sort_windows (
    user_id  text NOT NULL,
    minute   bigint NOT NULL,  -- floor(epoch seconds / 60)
    n        integer NOT NULL,
    PRIMARY KEY (user_id, minute)
);

-- Times as the protocol writes them: ISO 8601 UTC, milliseconds (truncated), a Z.
CREATE FUNCTION ss_iso(t timestamptz) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- The job object of PROTOCOL.md §3 as compact JSON, field for field what jobs.job_object builds
-- (tests/test_jobs.py holds the two together). One difference nobody sees: a percent that is
-- exactly halfway at the second decimal (0.25) rounds up here and to even in Python.
CREATE FUNCTION ss_job_json(j jobs) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT '{"id":"' || j.id::text
        || '","group":' || to_json(j.group_id)::text
        || ',"status":' || to_json(j.status)::text
        || ',"stage":' || coalesce(to_json(j.stage)::text, 'null')
        || ',"progress":{"done":' || j.done || ',"total":' || j.total || ',"percent":'
        || CASE WHEN j.status = 'completed' THEN '100.0'
                WHEN j.total > 0 THEN round(100.0 * j.done / j.total, 1)::text
                ELSE '0.0' END
        || '},"attempt":' || j.attempt
        || ',"requested_by":' || to_json(j.requested_by)::text
        || ',"created_at":' || coalesce('"' || ss_iso(j.created_at) || '"', 'null')
        || ',"started_at":' || coalesce('"' || ss_iso(j.started_at) || '"', 'null')
        || ',"finished_at":' || coalesce('"' || ss_iso(j.finished_at) || '"', 'null')
        || ',"error":' || coalesce(j.error::text, 'null')
        || ',"result":' || coalesce(j.result::text, 'null')
        || '}'
$$;
