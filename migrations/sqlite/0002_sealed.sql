-- Installed entries may carry tokens: from now on they are sealed with the
-- master key. Plaintext rows written by 0001 are moved here and sealed into
-- the new table by the store when it opens with a key (SQL cannot encrypt).
ALTER TABLE installed RENAME TO installed_plaintext;

CREATE TABLE installed (
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    section    TEXT NOT NULL,
    entry      TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    adopted_at TEXT NOT NULL,
    PRIMARY KEY (namespace, name, section, entry)
);

-- The encrypted secret store: one sealed value per (namespace, name).
CREATE TABLE secrets (
    namespace  TEXT NOT NULL,
    name       TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);

-- Identical passes that changed nothing are counted on one row.
ALTER TABLE audit ADD COLUMN fingerprint TEXT;
ALTER TABLE audit ADD COLUMN repeats INTEGER NOT NULL DEFAULT 1;
ALTER TABLE audit ADD COLUMN last_at TEXT;
