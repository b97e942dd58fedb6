-- Per-database values the operator needs, such as the ledger hash salt.
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

-- Runtime installs adopted per instance, in Claude Code's shape.
CREATE TABLE installed (
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    section    TEXT NOT NULL,
    entry      TEXT NOT NULL,
    value      TEXT NOT NULL,
    adopted_at TEXT NOT NULL,
    PRIMARY KEY (namespace, name, section, entry)
);

-- What each pass did per instance.
CREATE TABLE audit (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace    TEXT NOT NULL,
    name         TEXT NOT NULL,
    at           TEXT NOT NULL,
    outcome      TEXT NOT NULL,
    content_hash TEXT,
    details      TEXT NOT NULL
);
CREATE INDEX audit_by_instance ON audit (namespace, name, id);
