-- Users, groups, members, songs, jobs and the group event log (the outbox).

CREATE TABLE users (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE groups (
    id                text PRIMARY KEY,
    name              text NOT NULL,
    playlist_version  bigint NOT NULL DEFAULT 0,
    -- The seq of the group's newest event. Bumped with UPDATE ... RETURNING inside the
    -- transaction that appends the event: the row lock makes seqs gap-free and ordered by commit.
    last_seq          bigint NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE members (
    group_id   text NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    user_id    text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, user_id)
);
CREATE INDEX members_user ON members (user_id);

CREATE TABLE songs (
    id         text PRIMARY KEY,
    group_id   text NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    title      text NOT NULL,
    artist     text NOT NULL,
    url        text,
    added_by   text,
    added_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    metadata   jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Placement: null until a sort places the song.
    category   text,
    position   integer,
    analysis   jsonb
);
CREATE INDEX songs_group_order ON songs (group_id, position NULLS LAST, added_at, id);

CREATE TABLE jobs (
    id                   uuid PRIMARY KEY,
    group_id             text NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    status               text NOT NULL CHECK (status IN
                           ('queued', 'running', 'retrying', 'completed', 'failed', 'cancelled')),
    stage                text,
    done                 integer NOT NULL DEFAULT 0,
    total                integer NOT NULL DEFAULT 0,
    attempt              integer NOT NULL DEFAULT 0,
    requested_by         text NOT NULL,
    idempotency_key      text,
    options              jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at           timestamptz,
    finished_at          timestamptz,
    run_after            timestamptz NOT NULL DEFAULT clock_timestamp(),
    lease_owner          text,
    lease_expires_at     timestamptz,
    error                jsonb,
    result               jsonb
);
-- One active job per group is a database fact, not an if: concurrent sorts race on this index.
CREATE UNIQUE INDEX jobs_one_active ON jobs (group_id)
    WHERE status IN ('queued', 'running', 'retrying');
CREATE UNIQUE INDEX jobs_idempotency ON jobs (requested_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_claimable ON jobs (run_after) WHERE status IN ('queued', 'retrying');
CREATE INDEX jobs_group_recent ON jobs (group_id, created_at DESC);

CREATE TABLE group_events (
    group_id  text NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    seq       bigint NOT NULL,
    type      text NOT NULL,
    ts        timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The exact bytes sent to clients, encoded once when the event is appended.
    data      text NOT NULL,
    PRIMARY KEY (group_id, seq)
);
CREATE INDEX group_events_ts ON group_events (ts);

-- Analyses cached per track (normalised artist + title) and analyser, shared by every group.
CREATE TABLE song_analyses (
    track_key   text NOT NULL,
    analyzer    text NOT NULL,
    analysis    jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (track_key, analyzer)
);
