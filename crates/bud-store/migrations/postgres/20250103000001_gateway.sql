-- What budgateway reads: replica addresses of endpoints, routes, the configuration version it
-- polls, and the usage it writes. Keep in step with ../sqlite; id columns use the "C"
-- collation, as in the initial migration.

-- JSON array of "host:port" of the replicas the reconciler last saw ready, sorted.
ALTER TABLE endpoints ADD COLUMN addresses TEXT NOT NULL DEFAULT '[]';

-- A public model name in a project and where its requests go. Targets and fallbacks are JSON
-- arrays of {"endpoint_id" | "provider_id", "model"?, "weight"}; the endpoints and providers
-- they name carry no foreign key (a target that is gone is left out of the gateway's snapshot).
CREATE TABLE routes (
    id         TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    project_id TEXT COLLATE "C" NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    targets    TEXT NOT NULL,
    fallbacks  TEXT NOT NULL,
    rpm_limit  BIGINT,
    tpm_limit  BIGINT,
    created_by TEXT COLLATE "C" REFERENCES users (id) ON DELETE SET NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX routes_project_name_key ON routes (project_id, name);

-- One row, bumped by the triggers below whenever something the gateway's snapshot is built from
-- changes (keys, routes, providers, model names, endpoint status and addresses). budgateway
-- polls it and reads the rest only when it moved. A counter rather than the newest timestamp
-- of those tables: a change that commits with an older timestamp than one already seen
-- (concurrent writers, clocks of several replicas, the same millisecond) would otherwise never
-- reach the gateway, and a missed key revocation is a security failure. The row lock the
-- trigger takes is held to commit, so versions follow commit order.
CREATE TABLE config_version (
    id      INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO config_version (id, version) VALUES (1, 1);

CREATE FUNCTION bump_config_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE config_version SET version = version + 1 WHERE id = 1;
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_keys_config AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION bump_config_version();
CREATE TRIGGER routes_config AFTER INSERT OR UPDATE OR DELETE ON routes
    FOR EACH ROW EXECUTE FUNCTION bump_config_version();
CREATE TRIGGER providers_config AFTER INSERT OR UPDATE OR DELETE ON providers
    FOR EACH ROW EXECUTE FUNCTION bump_config_version();
-- Implicit routes are named after the model: only a rename matters.
CREATE TRIGGER models_update_config AFTER UPDATE ON models
    FOR EACH ROW WHEN (OLD.name IS DISTINCT FROM NEW.name)
    EXECUTE FUNCTION bump_config_version();
-- Only RUNNING endpoints are routed, to their addresses; ready counts and spec changes alone
-- do not change the snapshot.
CREATE TRIGGER endpoints_insert_delete_config AFTER INSERT OR DELETE ON endpoints
    FOR EACH ROW EXECUTE FUNCTION bump_config_version();
CREATE TRIGGER endpoints_update_config AFTER UPDATE ON endpoints
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.addresses IS DISTINCT FROM NEW.addresses)
    EXECUTE FUNCTION bump_config_version();

-- What the gateway answered, one row per request. No foreign keys: usage outlives the keys and
-- projects it names, like the audit log, and a batch never fails for a key deleted meanwhile.
CREATE TABLE usage (
    id                TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    at                BIGINT NOT NULL,
    key_id            TEXT COLLATE "C" NOT NULL,
    project_id        TEXT COLLATE "C" NOT NULL,
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
