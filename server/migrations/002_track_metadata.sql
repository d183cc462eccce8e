-- Metadata fetched from a provider (MusicBrainz), cached per track like analyses.
CREATE TABLE track_metadata (
    track_key   text NOT NULL,
    provider    text NOT NULL,
    data        jsonb NOT NULL,
    fetched_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (track_key, provider)
);
