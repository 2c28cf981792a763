-- What budgateway reads: replica addresses of endpoints, routes, the configuration version it
-- polls, and the usage it writes. Keep in step with ../postgres.

-- JSON array of "host:port" of the replicas the reconciler last saw ready, sorted.
ALTER TABLE endpoints ADD COLUMN addresses TEXT NOT NULL DEFAULT '[]';

-- A public model name in a project and where its requests go. Targets and fallbacks are JSON
-- arrays of {"endpoint_id" | "provider_id", "model"?, "weight"}; the endpoints and providers
-- they name carry no foreign key (a target that is gone is left out of the gateway's snapshot).
CREATE TABLE routes (
    id         TEXT PRIMARY KEY NOT NULL,
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    targets    TEXT NOT NULL,
    fallbacks  TEXT NOT NULL,
    rpm_limit  BIGINT,
    tpm_limit  BIGINT,
    created_by TEXT REFERENCES users (id) ON DELETE SET NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX routes_project_name_key ON routes (project_id, name);

-- One row, bumped by the triggers below whenever something the gateway's snapshot is built from
-- changes (keys, routes, providers, model names, endpoint status and addresses). budgateway
-- polls it and reads the rest only when it moved. A counter rather than the newest timestamp
-- of those tables: a change that commits with an older timestamp than one already seen
-- (concurrent writers, clocks of several replicas, the same millisecond) would otherwise never
-- reach the gateway, and a missed key revocation is a security failure.
CREATE TABLE config_version (
    id      INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO config_version (id, version) VALUES (1, 1);

CREATE TRIGGER api_keys_insert_config AFTER INSERT ON api_keys
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER api_keys_update_config AFTER UPDATE ON api_keys
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER api_keys_delete_config AFTER DELETE ON api_keys
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;

CREATE TRIGGER routes_insert_config AFTER INSERT ON routes
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER routes_update_config AFTER UPDATE ON routes
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER routes_delete_config AFTER DELETE ON routes
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;

CREATE TRIGGER providers_insert_config AFTER INSERT ON providers
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER providers_update_config AFTER UPDATE ON providers
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER providers_delete_config AFTER DELETE ON providers
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;

-- Implicit routes are named after the model: only a rename matters.
CREATE TRIGGER models_update_config AFTER UPDATE ON models
WHEN OLD.name IS NOT NEW.name
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;

-- Only RUNNING endpoints are routed, to their addresses; ready counts and spec changes alone
-- do not change the snapshot.
CREATE TRIGGER endpoints_insert_config AFTER INSERT ON endpoints
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER endpoints_update_config AFTER UPDATE ON endpoints
WHEN OLD.status IS NOT NEW.status OR OLD.addresses IS NOT NEW.addresses
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER endpoints_delete_config AFTER DELETE ON endpoints
BEGIN UPDATE config_version SET version = version + 1 WHERE id = 1; END;

-- What the gateway answered, one row per request. No foreign keys: usage outlives the keys and
-- projects it names, like the audit log, and a batch never fails for a key deleted meanwhile.
CREATE TABLE usage (
    id                TEXT PRIMARY KEY NOT NULL,
    at                BIGINT NOT NULL,
    key_id            TEXT NOT NULL,
    project_id        TEXT NOT NULL,
    model             TEXT NOT NULL,
    route             TEXT NOT NULL,
    target            TEXT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    latency_ms        BIGINT NOT NULL,
    status            BIGINT NOT NULL
);
CREATE INDEX usage_project_at_idx ON usage (project_id, at);
-- For platform-wide summaries, which name no project.
CREATE INDEX usage_at_idx ON usage (at);
