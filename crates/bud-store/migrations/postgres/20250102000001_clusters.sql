-- Clusters, the endpoints deployed on them, what happened to both, and leases that let several
-- budcluster replicas share one database. Keep in step with ../sqlite; id columns use the "C"
-- collation, as in the initial migration.

-- A cluster budcluster deploys to: this machine (`local`) or a Kubernetes cluster reached
-- through its sealed kubeconfig.
CREATE TABLE clusters (
    id                    TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    name                  TEXT NOT NULL,
    kind                  TEXT NOT NULL,
    -- Empty for the local cluster.
    kubeconfig_ciphertext TEXT NOT NULL,
    namespace             TEXT NOT NULL,
    status                TEXT NOT NULL,
    reason                TEXT NOT NULL,
    consecutive_failures  BIGINT NOT NULL,
    last_checked_at       BIGINT,
    -- JSON: nodes and GPUs as the last successful probe found them.
    inventory             TEXT,
    created_by            TEXT COLLATE "C" REFERENCES users (id) ON DELETE SET NULL,
    created_at            BIGINT NOT NULL,
    updated_at            BIGINT NOT NULL
);
CREATE UNIQUE INDEX clusters_name_key ON clusters (name);

CREATE TABLE cluster_events (
    id          TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    cluster_id  TEXT COLLATE "C" NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    at          BIGINT NOT NULL,
    from_status TEXT,
    to_status   TEXT NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX cluster_events_cluster_idx ON cluster_events (cluster_id, at);

-- Endpoints hold GPUs on a cluster, so nothing they refer to may disappear under them: the
-- project, model and cluster are deleted only once their endpoints are gone (RESTRICT).
CREATE TABLE endpoints (
    id                      TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    project_id              TEXT COLLATE "C" NOT NULL REFERENCES projects (id) ON DELETE RESTRICT,
    model_id                TEXT COLLATE "C" NOT NULL REFERENCES models (id) ON DELETE RESTRICT,
    cluster_id              TEXT COLLATE "C" NOT NULL REFERENCES clusters (id) ON DELETE RESTRICT,
    name                    TEXT NOT NULL,
    replicas                BIGINT NOT NULL,
    min_replicas            BIGINT NOT NULL,
    -- JSON array of strings.
    engine_args             TEXT NOT NULL,
    gpus_per_replica        BIGINT NOT NULL,
    deployment_timeout_secs BIGINT NOT NULL,
    status                  TEXT NOT NULL,
    reason                  TEXT,
    reason_detail           TEXT NOT NULL,
    status_since            BIGINT NOT NULL,
    ready_replicas          BIGINT NOT NULL,
    generation              BIGINT NOT NULL,
    created_by              TEXT COLLATE "C" REFERENCES users (id) ON DELETE SET NULL,
    created_at              BIGINT NOT NULL,
    updated_at              BIGINT NOT NULL
);
CREATE UNIQUE INDEX endpoints_project_name_key ON endpoints (project_id, name);
CREATE INDEX endpoints_cluster_idx ON endpoints (cluster_id, id);
-- Lets deleting a model check for endpoints without scanning them all.
CREATE INDEX endpoints_model_idx ON endpoints (model_id);

CREATE TABLE endpoint_events (
    id          TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    endpoint_id TEXT COLLATE "C" NOT NULL REFERENCES endpoints (id) ON DELETE CASCADE,
    at          BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    message     TEXT NOT NULL
);
CREATE INDEX endpoint_events_endpoint_idx ON endpoint_events (endpoint_id, at);

-- One holder per name until expires_at (unix ms), e.g. "cluster:<id>".
CREATE TABLE leases (
    name       TEXT PRIMARY KEY NOT NULL,
    holder     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
