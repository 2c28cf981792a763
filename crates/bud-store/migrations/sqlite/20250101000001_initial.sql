-- Bud's schema on SQLite. Ids are UUID text, timestamps unix milliseconds (BIGINT), flags are
-- nullable timestamps. Keep in step with ../postgres: both define the same tables.

CREATE TABLE users (
    id            TEXT PRIMARY KEY NOT NULL,
    email         TEXT NOT NULL,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    password_hash TEXT,
    issuer        TEXT,
    subject       TEXT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    disabled_at   BIGINT
);
CREATE UNIQUE INDEX users_email_key ON users (email);
CREATE UNIQUE INDEX users_issuer_subject_key ON users (issuer, subject);

CREATE TABLE projects (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    created_by  TEXT REFERENCES users (id) ON DELETE SET NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE UNIQUE INDEX projects_name_key ON projects (name);

CREATE TABLE project_members (
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    added_at   BIGINT NOT NULL,
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX project_members_user_idx ON project_members (user_id);

CREATE TABLE grants (
    id         TEXT PRIMARY KEY NOT NULL,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    permission TEXT NOT NULL,
    project_id TEXT REFERENCES projects (id) ON DELETE CASCADE,
    granted_by TEXT REFERENCES users (id) ON DELETE SET NULL,
    created_at BIGINT NOT NULL
);
-- A user holds a permission once per scope; NULL project ids never collide in a unique index,
-- so platform-wide grants get their own partial index.
CREATE UNIQUE INDEX grants_platform_key ON grants (user_id, permission) WHERE project_id IS NULL;
CREATE UNIQUE INDEX grants_project_key ON grants (user_id, permission, project_id)
    WHERE project_id IS NOT NULL;
CREATE INDEX grants_project_idx ON grants (project_id);

CREATE TABLE models (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    source_uri  TEXT NOT NULL,
    engine      TEXT NOT NULL,
    modality    TEXT NOT NULL,
    description TEXT NOT NULL,
    created_by  TEXT REFERENCES users (id) ON DELETE SET NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE UNIQUE INDEX models_name_key ON models (name);

CREATE TABLE providers (
    id                 TEXT PRIMARY KEY NOT NULL,
    name               TEXT NOT NULL,
    base_url           TEXT NOT NULL,
    api_key_ciphertext TEXT NOT NULL,
    created_by         TEXT REFERENCES users (id) ON DELETE SET NULL,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL
);
CREATE UNIQUE INDEX providers_name_key ON providers (name);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY NOT NULL,
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    prefix     TEXT NOT NULL,
    hash       TEXT NOT NULL,
    created_by TEXT REFERENCES users (id) ON DELETE SET NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    rpm_limit  BIGINT,
    tpm_limit  BIGINT
);
CREATE UNIQUE INDEX api_keys_hash_key ON api_keys (hash);
CREATE INDEX api_keys_project_idx ON api_keys (project_id, id);

CREATE TABLE refresh_tokens (
    id         TEXT PRIMARY KEY NOT NULL,
    family_id  TEXT NOT NULL,
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT,
    revoked_at BIGINT
);
CREATE UNIQUE INDEX refresh_tokens_hash_key ON refresh_tokens (token_hash);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user_idx ON refresh_tokens (user_id);

CREATE TABLE signing_keys (
    kid                    TEXT PRIMARY KEY NOT NULL,
    algorithm              TEXT NOT NULL,
    private_key_ciphertext TEXT NOT NULL,
    public_jwk             TEXT NOT NULL,
    created_at             BIGINT NOT NULL,
    retired_at             BIGINT
);

-- The audit log is append-only and hash-chained; actor and project ids carry no foreign keys so
-- records outlive what they describe.
CREATE TABLE audit_log (
    seq           BIGINT PRIMARY KEY NOT NULL,
    at            BIGINT NOT NULL,
    actor_id      TEXT,
    actor         TEXT NOT NULL,
    action        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    project_id    TEXT,
    details       TEXT NOT NULL,
    request_id    TEXT,
    prev_hash     TEXT NOT NULL,
    hash          TEXT NOT NULL
);
CREATE INDEX audit_log_actor_idx ON audit_log (actor_id, seq);
CREATE INDEX audit_log_resource_idx ON audit_log (resource_type, resource_id, seq);
CREATE INDEX audit_log_project_idx ON audit_log (project_id, seq);
CREATE INDEX audit_log_at_idx ON audit_log (at);

-- The chain's head: the last seq and hash. Appenders lock this one row.
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
