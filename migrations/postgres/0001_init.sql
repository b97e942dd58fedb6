-- Per-database values the operator needs, such as the sealed ledger hash salt.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

-- What was last written per instance: hashes only, never values.
CREATE TABLE ledger (
    namespace    TEXT NOT NULL,
    name         TEXT NOT NULL,
    entries      TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    written_at   TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);

-- Runtime installs adopted per instance, sealed with the master key.
CREATE TABLE installed (
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    section    TEXT NOT NULL,
    entry      TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    nonce      BYTEA NOT NULL,
    ciphertext BYTEA NOT NULL,
    adopted_at TEXT NOT NULL,
    PRIMARY KEY (namespace, name, section, entry)
);

-- The encrypted secret store: one sealed value per (namespace, name).
CREATE TABLE secrets (
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    nonce      BYTEA NOT NULL,
    ciphertext BYTEA NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);

-- What each pass did per instance; identical passes that changed nothing
-- are counted on one row.
CREATE TABLE audit (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace    TEXT NOT NULL,
    name         TEXT NOT NULL,
    at           TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    content_hash TEXT,
    details      TEXT NOT NULL,
    fingerprint  TEXT,
    repeats      BIGINT NOT NULL DEFAULT 1,
    last_at      TEXT
);
CREATE INDEX audit_by_instance ON audit (namespace, name, id);
