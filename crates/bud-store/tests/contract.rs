//! The store's contract, run against both backends: every test body is written once as an async
//! fn over a fresh database, and `contract_tests!` runs it as `sqlite::<name>` and
//! `postgres::<name>`. PostgreSQL tests run when `BUD_TEST_POSTGRES_URL` names an admin URL,
//! each on a database of its own; otherwise they print that they were skipped.

// The bodies are plain async fns, not #[test]s, so clippy's test allowances do not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::time::Duration;

use bud_domain::{
    ApiKeyId, ClusterId, ClusterStatus, Cursor, Email, EndpointId, EndpointStatus, Engine,
    FailureReason, Grant, GrantId, Modality, ModelId, Name, Page, PageLimit, Permission, ProjectId,
    ProviderId, Role, RouteId, SourceUri, Timestamp, UserId,
};
use bud_store::testing::{TestDatabase, fresh_postgres, fresh_sqlite, postgres_admin_url};
use bud_store::{
    ApiKey, AuditEvent, AuditFilter, AuditRecord, Backend, Cluster, ClusterKind,
    DEFAULT_WORKLOADS_NAMESPACE, Endpoint, EndpointEvent, EndpointPatch, GENESIS_HASH,
    GatewayEndpoint, GatewayKey, GatewayProvider, GatewayRoute, GrantRecord, Inventory, Model,
    ModelPatch, ProbeRecord, Project, ProjectPatch, Provider, ProviderPatch, RefreshToken, Route,
    RoutePatch, RouteTarget, RouteUpstream, SealedKind, SigningKey, StatusChange, Store,
    StoreConfig, StoreError, UsageFilter, UsageGroup, UsageRow, UsageSummaryRow, User, UserPatch,
    audit_hash,
};
use sqlx::Connection;

macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::fresh_sqlite().await.expect("fresh sqlite database");
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(admin_url) = super::postgres_admin_url() else {
                        eprintln!("skipped: BUD_TEST_POSTGRES_URL not set");
                        return;
                    };
                    let db = super::fresh_postgres(&admin_url).await.expect("fresh postgres database");
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

contract_tests!(
    connects_pings_and_migrates_idempotently,
    users_round_trip_and_paginate,
    user_conflicts_name_what_collided,
    update_user_patches_fields_and_disables_once,
    grants_are_unique_per_user_permission_and_project,
    grants_reference_existing_users_and_projects,
    projects_round_trip_with_creator_membership,
    project_visibility_follows_membership_and_grants,
    update_and_delete_project_cascade,
    members_add_remove_and_paginate,
    models_round_trip_update_and_delete,
    providers_round_trip_update_and_delete,
    api_keys_by_hash_list_and_revoke_idempotently,
    refresh_tokens_are_used_once_and_revoked_by_family,
    signing_keys_newest_first_and_retired_once,
    every_change_is_audited_and_failed_changes_are_not,
    audit_list_filters_and_paginates,
    audit_verify_detects_a_changed_field,
    audit_verify_detects_a_deleted_record,
    audit_verify_detects_a_truncated_tail,
    concurrent_appenders_keep_the_chain_unbroken,
    corrupt_rows_are_reported_as_corrupt,
    a_locked_database_is_unavailable,
    a_closed_pool_is_unavailable,
    a_saturated_pool_fails_fast,
    clusters_round_trip_paginate_and_conflict,
    cluster_probes_are_compare_and_set,
    user_cluster_changes_are_audited_and_recorded,
    deleting_what_endpoints_use_is_refused,
    endpoints_round_trip_paginate_and_follow_visibility,
    endpoint_conflicts_and_references,
    update_endpoint_bumps_the_generation,
    transition_endpoint_is_compare_and_set,
    set_ready_replicas_writes_only_changes,
    endpoint_events_are_listed_newest_first,
    leases_have_one_holder_at_a_time,
    concurrent_acquirers_of_a_lease_one_wins,
    sealed_kubeconfigs_are_listed_and_resealable,
    a_reconcile_pass_that_changes_nothing_writes_nothing,
    routes_round_trip_update_and_delete,
    gateway_config_holds_what_the_gateway_routes_with,
    config_version_moves_with_every_gateway_change,
    usage_is_inserted_once_and_summarised,
);

// ---------------------------------------------------------------------------------------------
// Helpers

fn ts(ms: i64) -> Timestamp {
    chrono::DateTime::from_timestamp_millis(ms).unwrap()
}

/// Now, at the millisecond precision the store keeps.
fn now() -> Timestamp {
    ts(chrono::Utc::now().timestamp_millis())
}

fn name(s: &str) -> Name {
    Name::parse("name", s).unwrap()
}

fn email(s: &str) -> Email {
    Email::parse("email", s).unwrap()
}

fn limit(n: u32) -> PageLimit {
    PageLimit::parse(Some(n)).unwrap()
}

fn perm(s: &str) -> Permission {
    s.parse().unwrap()
}

fn event(action: &str, resource_type: &str, resource_id: impl ToString) -> AuditEvent {
    AuditEvent {
        at: now(),
        actor_id: None,
        actor: "system".to_owned(),
        action: action.to_owned(),
        resource_type: resource_type.to_owned(),
        resource_id: resource_id.to_string(),
        project_id: None,
        details: serde_json::json!({}),
        request_id: None,
    }
}

fn user_record(address: &str) -> User {
    User {
        id: UserId::new(),
        email: email(address),
        name: name(address.split('@').next().unwrap()),
        role: Role::Developer,
        password_hash: Some("argon2-hash".to_owned()),
        issuer: None,
        subject: None,
        created_at: now(),
        updated_at: now(),
        disabled_at: None,
    }
}

async fn new_user(store: &Store, address: &str) -> User {
    let user = user_record(address);
    store.create_user(&user, &event("user.create", "user", user.id)).await.unwrap();
    user
}

fn project_record(project_name: &str, created_by: Option<UserId>) -> Project {
    Project {
        id: ProjectId::new(),
        name: name(project_name),
        description: format!("{project_name} description"),
        created_by,
        created_at: now(),
        updated_at: now(),
    }
}

async fn new_project(store: &Store, project_name: &str, creator: Option<UserId>) -> Project {
    let project = project_record(project_name, creator);
    let member = creator.map(|u| (u, now()));
    let audit = event("project.create", "project", project.id);
    store.create_project(&project, member, &audit).await.unwrap();
    project
}

fn model_record(model_name: &str) -> Model {
    Model {
        id: ModelId::new(),
        name: name(model_name),
        source_uri: SourceUri::parse("source_uri", "hf://meta-llama/Llama-3.1-8B").unwrap(),
        engine: Engine::Vllm,
        modality: Modality::Text,
        description: String::new(),
        created_by: None,
        created_at: now(),
        updated_at: now(),
    }
}

fn api_key_record(project: ProjectId, hash: &str) -> ApiKey {
    ApiKey {
        id: ApiKeyId::new(),
        project_id: project,
        name: name("ci"),
        prefix: "bud_abc".to_owned(),
        hash: hash.to_owned(),
        created_by: None,
        created_at: now(),
        expires_at: Some(ts(4_000_000_000_000)),
        revoked_at: None,
        rpm_limit: Some(60),
        tpm_limit: None,
    }
}

fn refresh_token(user: UserId, family: &str, hash: &str) -> RefreshToken {
    RefreshToken {
        id: uuid::Uuid::now_v7().to_string(),
        family_id: family.to_owned(),
        user_id: user,
        token_hash: hash.to_owned(),
        created_at: now(),
        expires_at: ts(4_000_000_000_000),
        used_at: None,
        revoked_at: None,
    }
}

/// Follows cursors to the end and returns every page's items.
async fn all_pages<T>(mut fetch: impl AsyncFnMut(Option<Cursor>) -> Page<T>) -> Vec<Vec<T>> {
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let page = fetch(cursor).await;
        pages.push(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return pages,
        }
    }
}

fn assert_conflict(result: Result<impl std::fmt::Debug, StoreError>, what: &str) {
    match result {
        Err(StoreError::Conflict { what: got }) => assert_eq!(got, what),
        other => panic!("expected Conflict {what:?}, got {other:?}"),
    }
}

fn assert_reference(result: Result<impl std::fmt::Debug, StoreError>, what: &str) {
    match result {
        Err(StoreError::Reference { what: got }) => assert_eq!(got, what),
        other => panic!("expected Reference {what:?}, got {other:?}"),
    }
}

async fn audit_count(store: &Store) -> usize {
    let filter = AuditFilter::default();
    all_pages(async |c| store.list_audit(&filter, c.as_ref(), limit(200)).await.unwrap())
        .await
        .concat()
        .len()
}

// ---------------------------------------------------------------------------------------------
// Contract

async fn connects_pings_and_migrates_idempotently(db: &TestDatabase) {
    db.ping().await.unwrap();
    db.migrate().await.unwrap();
    db.migrate().await.unwrap();
    let (size, idle) = db.pool_stats();
    assert!(size >= 1 && idle <= size as usize);
    let expected =
        if db.config().url.starts_with("sqlite:") { Backend::Sqlite } else { Backend::Postgres };
    assert_eq!(db.backend(), expected);
    assert_eq!(db.count_users().await.unwrap(), 0);
    assert_eq!(db.verify_audit().await.unwrap().records_checked, 0);
}

async fn users_round_trip_and_paginate(db: &TestDatabase) {
    let mut users = Vec::new();
    for i in 0..5 {
        users.push(new_user(db, &format!("user{i}@example.com")).await);
    }
    let mut external = user_record("oidc@example.com");
    external.password_hash = None;
    external.issuer = Some("https://idp.example.com".to_owned());
    external.subject = Some("sub-1".to_owned());
    external.disabled_at = Some(ts(1_700_000_000_000));
    db.create_user(&external, &event("user.create", "user", external.id)).await.unwrap();
    users.push(external.clone());

    assert_eq!(db.user(users[2].id).await.unwrap().as_ref(), Some(&users[2]));
    assert_eq!(db.user(UserId::new()).await.unwrap(), None);
    assert_eq!(
        db.user_by_email(&email("user3@example.com")).await.unwrap(),
        Some(users[3].clone())
    );
    assert_eq!(db.user_by_email(&email("nobody@example.com")).await.unwrap(), None);
    assert_eq!(
        db.user_by_subject("https://idp.example.com", "sub-1").await.unwrap(),
        Some(external)
    );
    assert_eq!(db.user_by_subject("https://idp.example.com", "sub-2").await.unwrap(), None);
    assert_eq!(db.count_users().await.unwrap(), 6);

    let pages = all_pages(async |c| db.list_users(c.as_ref(), limit(4)).await.unwrap()).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 2]);
    let mut expected = users.clone();
    expected.sort_by_key(|u| u.id.to_string());
    assert_eq!(pages.concat(), expected);

    // A page that ends exactly at the last row has no cursor.
    let exact = db.list_users(None, limit(6)).await.unwrap();
    assert_eq!(exact.items.len(), 6);
    assert_eq!(exact.next_cursor, None);
}

async fn user_conflicts_name_what_collided(db: &TestDatabase) {
    new_user(db, "ada@example.com").await;
    let again = user_record("ada@example.com");
    let result = db.create_user(&again, &event("user.create", "user", again.id)).await;
    assert_conflict(result, "a user with this email already exists");

    let mut first = user_record("one@example.com");
    first.issuer = Some("https://idp".to_owned());
    first.subject = Some("s".to_owned());
    db.create_user(&first, &event("user.create", "user", first.id)).await.unwrap();
    let mut second = user_record("two@example.com");
    second.issuer = first.issuer.clone();
    second.subject = first.subject.clone();
    let result = db.create_user(&second, &event("user.create", "user", second.id)).await;
    assert_conflict(result, "a user with this identity provider subject already exists");
}

async fn update_user_patches_fields_and_disables_once(db: &TestDatabase) {
    let user = new_user(db, "ada@example.com").await;
    let audit = event("user.update", "user", user.id);

    let patch = UserPatch {
        name: Some(name("Ada Lovelace")),
        role: Some(Role::Admin),
        ..UserPatch::default()
    };
    let updated = db.update_user(user.id, &patch, ts(2_000_000_000_000), &audit).await.unwrap();
    let updated = updated.unwrap();
    assert_eq!(updated.name, name("Ada Lovelace"));
    assert_eq!(updated.role, Role::Admin);
    assert_eq!(updated.password_hash, user.password_hash);
    assert_eq!(updated.updated_at, ts(2_000_000_000_000));
    assert_eq!(updated.created_at, user.created_at);
    assert_eq!(db.user(user.id).await.unwrap(), Some(updated));

    let disable = UserPatch { disabled: Some(true), ..UserPatch::default() };
    let first = db.update_user(user.id, &disable, ts(2_000_000_000_001), &audit).await.unwrap();
    assert_eq!(first.unwrap().disabled_at, Some(ts(2_000_000_000_001)));
    let second = db.update_user(user.id, &disable, ts(2_000_000_000_002), &audit).await.unwrap();
    assert_eq!(second.unwrap().disabled_at, Some(ts(2_000_000_000_001)), "keeps the first");

    let enable = UserPatch {
        disabled: Some(false),
        password_hash: Some("new-hash".to_owned()),
        ..UserPatch::default()
    };
    let enabled = db.update_user(user.id, &enable, now(), &audit).await.unwrap().unwrap();
    assert_eq!(enabled.disabled_at, None);
    assert_eq!(enabled.password_hash.as_deref(), Some("new-hash"));

    assert_eq!(db.update_user(UserId::new(), &enable, now(), &audit).await.unwrap(), None);
}

async fn grants_are_unique_per_user_permission_and_project(db: &TestDatabase) {
    let user = new_user(db, "ada@example.com").await;
    let admin = new_user(db, "root@example.com").await;
    let p1 = new_project(db, "one", None).await;
    let p2 = new_project(db, "two", None).await;
    let audit = event("grant.create", "user", user.id);
    let record = |permission: &str, project: Option<ProjectId>| GrantRecord {
        id: GrantId::new(),
        user_id: user.id,
        grant: Grant::new(perm(permission), project).unwrap(),
        granted_by: Some(admin.id),
        created_at: now(),
    };

    let platform = record("model:manage", None);
    let in_p1 = record("key:manage", Some(p1.id));
    let in_p2 = record("key:manage", Some(p2.id));
    for g in [&platform, &in_p1, &in_p2] {
        db.grant(g, &audit).await.unwrap();
    }
    const HELD: &str = "the user already holds this permission";
    assert_conflict(db.grant(&record("model:manage", None), &audit).await, HELD);
    assert_conflict(db.grant(&record("key:manage", Some(p1.id)), &audit).await, HELD);
    // Another user may hold the same permission.
    let other = new_user(db, "bob@example.com").await;
    let mut theirs = record("model:manage", None);
    theirs.user_id = other.id;
    db.grant(&theirs, &audit).await.unwrap();

    let mut expected = vec![platform.clone(), in_p1.clone(), in_p2.clone()];
    expected.sort_by_key(|g| g.id.to_string());
    assert_eq!(db.grants_of(user.id).await.unwrap(), expected);

    assert!(db.revoke_grant(user.id, perm("key:manage"), Some(p1.id), &audit).await.unwrap());
    assert!(!db.revoke_grant(user.id, perm("key:manage"), Some(p1.id), &audit).await.unwrap());
    assert!(db.revoke_grant(user.id, perm("model:manage"), None, &audit).await.unwrap());
    assert!(!db.revoke_grant(user.id, perm("model:manage"), None, &audit).await.unwrap());
    assert_eq!(db.grants_of(user.id).await.unwrap(), vec![in_p2]);
    assert_eq!(db.grants_of(other.id).await.unwrap(), vec![theirs]);
}

async fn grants_reference_existing_users_and_projects(db: &TestDatabase) {
    let user = new_user(db, "ada@example.com").await;
    let audit = event("grant.create", "user", user.id);
    let missing_user = GrantRecord {
        id: GrantId::new(),
        user_id: UserId::new(),
        grant: Grant::new(perm("model:view"), None).unwrap(),
        granted_by: None,
        created_at: now(),
    };
    assert_reference(db.grant(&missing_user, &audit).await, "the user or project does not exist");
    let missing_project = GrantRecord {
        id: GrantId::new(),
        user_id: user.id,
        grant: Grant::new(perm("endpoint:view"), Some(ProjectId::new())).unwrap(),
        granted_by: None,
        created_at: now(),
    };
    assert_reference(
        db.grant(&missing_project, &audit).await,
        "the user or project does not exist",
    );
}

async fn projects_round_trip_with_creator_membership(db: &TestDatabase) {
    let ada = new_user(db, "ada@example.com").await;
    let mut projects = Vec::new();
    for i in 0..5 {
        projects.push(new_project(db, &format!("project {i}"), Some(ada.id)).await);
    }
    let orphan = new_project(db, "no creator", None).await;
    assert_eq!(db.project(projects[1].id).await.unwrap(), Some(projects[1].clone()));
    assert_eq!(db.project(orphan.id).await.unwrap(), Some(orphan.clone()));
    assert_eq!(db.project(ProjectId::new()).await.unwrap(), None);

    let mut memberships = db.memberships_of(ada.id).await.unwrap();
    memberships.sort_by_key(|id| id.to_string());
    let mut expected: Vec<_> = projects.iter().map(|p| p.id).collect();
    expected.sort_by_key(|id| id.to_string());
    assert_eq!(memberships, expected);

    let pages =
        all_pages(async |c| db.list_projects(None, c.as_ref(), limit(2)).await.unwrap()).await;
    assert_eq!(pages.len(), 3);
    projects.push(orphan);
    projects.sort_by_key(|p| p.id.to_string());
    assert_eq!(pages.concat(), projects);

    let duplicate = project_record("project 0", None);
    let result = db
        .create_project(&duplicate, None, &event("project.create", "project", duplicate.id))
        .await;
    assert_conflict(result, "a project with this name already exists");

    // A missing creator rolls the whole creation back.
    let lost = project_record("lost", None);
    let result = db
        .create_project(
            &lost,
            Some((UserId::new(), now())),
            &event("project.create", "project", lost.id),
        )
        .await;
    assert_reference(result, "the creator does not exist");
    assert_eq!(db.project(lost.id).await.unwrap(), None);
}

async fn project_visibility_follows_membership_and_grants(db: &TestDatabase) {
    let ada = new_user(db, "ada@example.com").await;
    let bob = new_user(db, "bob@example.com").await;
    let mine = new_project(db, "mine", Some(ada.id)).await;
    let granted = new_project(db, "granted", None).await;
    let hidden = new_project(db, "hidden", Some(bob.id)).await;
    let grant = GrantRecord {
        id: GrantId::new(),
        user_id: ada.id,
        grant: Grant::new(perm("endpoint:view"), Some(granted.id)).unwrap(),
        granted_by: None,
        created_at: now(),
    };
    db.grant(&grant, &event("grant.create", "user", ada.id)).await.unwrap();
    // A platform grant makes no project visible.
    let platform = GrantRecord {
        id: GrantId::new(),
        user_id: ada.id,
        grant: Grant::new(perm("model:view"), None).unwrap(),
        granted_by: None,
        created_at: now(),
    };
    db.grant(&platform, &event("grant.create", "user", ada.id)).await.unwrap();

    let visible =
        all_pages(async |c| db.list_projects(Some(ada.id), c.as_ref(), limit(1)).await.unwrap())
            .await
            .concat();
    let mut expected = vec![mine, granted];
    expected.sort_by_key(|p| p.id.to_string());
    assert_eq!(visible, expected);
    let bobs = db.list_projects(Some(bob.id), None, limit(10)).await.unwrap();
    assert_eq!(bobs.items, vec![hidden]);
    let all = db.list_projects(None, None, limit(10)).await.unwrap();
    assert_eq!(all.items.len(), 3);
}

async fn update_and_delete_project_cascade(db: &TestDatabase) {
    let ada = new_user(db, "ada@example.com").await;
    let project = new_project(db, "alpha", Some(ada.id)).await;
    new_project(db, "beta", None).await;
    let audit = event("project.update", "project", project.id);

    let patch = ProjectPatch { description: Some("new words".to_owned()), ..Default::default() };
    let updated = db.update_project(project.id, &patch, ts(2_000_000_000_000), &audit).await;
    let updated = updated.unwrap().unwrap();
    assert_eq!(updated.name, project.name);
    assert_eq!(updated.description, "new words");
    assert_eq!(updated.updated_at, ts(2_000_000_000_000));
    let rename = ProjectPatch { name: Some(name("beta")), description: None };
    assert_conflict(
        db.update_project(project.id, &rename, now(), &audit).await,
        "a project with this name already exists",
    );
    assert_eq!(db.update_project(ProjectId::new(), &patch, now(), &audit).await.unwrap(), None);

    let key = api_key_record(project.id, "hash-1");
    db.create_api_key(&key, &event("key.create", "api_key", key.id)).await.unwrap();
    let grant = GrantRecord {
        id: GrantId::new(),
        user_id: ada.id,
        grant: Grant::new(perm("key:manage"), Some(project.id)).unwrap(),
        granted_by: None,
        created_at: now(),
    };
    db.grant(&grant, &event("grant.create", "user", ada.id)).await.unwrap();

    let delete = event("project.delete", "project", project.id);
    assert!(db.delete_project(project.id, &delete).await.unwrap());
    assert!(!db.delete_project(project.id, &delete).await.unwrap());
    assert_eq!(db.project(project.id).await.unwrap(), None);
    assert_eq!(db.memberships_of(ada.id).await.unwrap(), vec![]);
    assert_eq!(db.api_key(key.id).await.unwrap(), None);
    assert_eq!(db.grants_of(ada.id).await.unwrap(), vec![]);
    assert!(db.members(project.id, None, limit(10)).await.unwrap().items.is_empty());
}

async fn members_add_remove_and_paginate(db: &TestDatabase) {
    let project = new_project(db, "alpha", None).await;
    let audit = event("project.member.add", "project", project.id);
    let mut users = Vec::new();
    for i in 0..5 {
        let user = new_user(db, &format!("member{i}@example.com")).await;
        db.add_member(project.id, user.id, ts(1_800_000_000_000 + i), &audit).await.unwrap();
        users.push(user);
    }
    assert_conflict(
        db.add_member(project.id, users[0].id, now(), &audit).await,
        "the user is already a member",
    );
    assert_reference(
        db.add_member(project.id, UserId::new(), now(), &audit).await,
        "user or project does not exist",
    );
    assert_reference(
        db.add_member(ProjectId::new(), users[0].id, now(), &audit).await,
        "user or project does not exist",
    );

    let pages =
        all_pages(async |c| db.members(project.id, c.as_ref(), limit(2)).await.unwrap()).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 1]);
    let members = pages.concat();
    let mut expected_ids: Vec<_> = users.iter().map(|u| u.id).collect();
    expected_ids.sort_by_key(|id| id.to_string());
    assert_eq!(members.iter().map(|m| m.user_id).collect::<Vec<_>>(), expected_ids);
    let first = members.iter().find(|m| m.user_id == users[0].id).unwrap();
    assert_eq!(first.email, users[0].email);
    assert_eq!(first.name, users[0].name);
    assert_eq!(first.project_id, project.id);
    assert_eq!(first.added_at, ts(1_800_000_000_000));

    assert_eq!(db.memberships_of(users[1].id).await.unwrap(), vec![project.id]);
    assert!(db.remove_member(project.id, users[1].id, &audit).await.unwrap());
    assert!(!db.remove_member(project.id, users[1].id, &audit).await.unwrap());
    assert_eq!(db.memberships_of(users[1].id).await.unwrap(), vec![]);
}

async fn models_round_trip_update_and_delete(db: &TestDatabase) {
    let mut models = Vec::new();
    for i in 0..3 {
        let model = model_record(&format!("model-{i}"));
        db.create_model(&model, &event("model.create", "model", model.id)).await.unwrap();
        models.push(model);
    }
    let duplicate = model_record("model-0");
    assert_conflict(
        db.create_model(&duplicate, &event("model.create", "model", duplicate.id)).await,
        "a model with this name already exists",
    );
    assert_eq!(db.model(models[0].id).await.unwrap(), Some(models[0].clone()));
    let pages = all_pages(async |c| db.list_models(c.as_ref(), limit(2)).await.unwrap()).await;
    assert_eq!(pages.concat(), models);

    let audit = event("model.update", "model", models[1].id);
    let patch = ModelPatch {
        engine: Some(Engine::EngineSim),
        modality: Some(Modality::Embedding),
        source_uri: Some(SourceUri::parse("source_uri", "/models/e5").unwrap()),
        description: Some("embeddings".to_owned()),
        name: None,
    };
    let updated = db.update_model(models[1].id, &patch, now(), &audit).await.unwrap().unwrap();
    assert_eq!(updated.engine, Engine::EngineSim);
    assert_eq!(updated.modality, Modality::Embedding);
    assert_eq!(updated.source_uri.as_str(), "/models/e5");
    assert_eq!(updated.name, models[1].name);
    let rename = ModelPatch { name: Some(name("model-2")), ..Default::default() };
    assert_conflict(
        db.update_model(models[1].id, &rename, now(), &audit).await,
        "a model with this name already exists",
    );
    assert_eq!(db.update_model(ModelId::new(), &patch, now(), &audit).await.unwrap(), None);

    assert!(db.delete_model(models[1].id, &audit).await.unwrap());
    assert!(!db.delete_model(models[1].id, &audit).await.unwrap());
    assert_eq!(db.model(models[1].id).await.unwrap(), None);
}

async fn providers_round_trip_update_and_delete(db: &TestDatabase) {
    let ada = new_user(db, "ada@example.com").await;
    let provider = Provider {
        id: ProviderId::new(),
        name: name("openai"),
        base_url: "https://api.openai.com/v1".to_owned(),
        api_key_ciphertext: "ciphertext".to_owned(),
        created_by: Some(ada.id),
        created_at: now(),
        updated_at: now(),
    };
    let audit = event("provider.create", "provider", provider.id);
    db.create_provider(&provider, &audit).await.unwrap();
    let mut again = provider.clone();
    again.id = ProviderId::new();
    assert_conflict(
        db.create_provider(&again, &audit).await,
        "a provider with this name already exists",
    );
    let mut orphan = provider.clone();
    orphan.id = ProviderId::new();
    orphan.name = name("other");
    orphan.created_by = Some(UserId::new());
    assert_reference(db.create_provider(&orphan, &audit).await, "the creator does not exist");

    assert_eq!(db.provider(provider.id).await.unwrap(), Some(provider.clone()));
    let page = db.list_providers(None, limit(10)).await.unwrap();
    assert_eq!(page.items, vec![provider.clone()]);
    assert_eq!(page.next_cursor, None);

    let patch = ProviderPatch {
        api_key_ciphertext: Some("rotated".to_owned()),
        ..ProviderPatch::default()
    };
    let updated = db.update_provider(provider.id, &patch, now(), &audit).await.unwrap().unwrap();
    assert_eq!(updated.api_key_ciphertext, "rotated");
    assert_eq!(updated.base_url, provider.base_url);
    assert_eq!(db.update_provider(ProviderId::new(), &patch, now(), &audit).await.unwrap(), None);
    assert!(db.delete_provider(provider.id, &audit).await.unwrap());
    assert!(!db.delete_provider(provider.id, &audit).await.unwrap());
    assert_eq!(db.provider(provider.id).await.unwrap(), None);
}

async fn api_keys_by_hash_list_and_revoke_idempotently(db: &TestDatabase) {
    let project = new_project(db, "alpha", None).await;
    let other = new_project(db, "beta", None).await;
    let audit = event("key.create", "api_key", "k");
    let mut keys = Vec::new();
    for i in 0..3 {
        let key = api_key_record(project.id, &format!("hash-{i}"));
        db.create_api_key(&key, &audit).await.unwrap();
        keys.push(key);
    }
    let elsewhere = api_key_record(other.id, "hash-other");
    db.create_api_key(&elsewhere, &audit).await.unwrap();
    assert_conflict(
        db.create_api_key(&api_key_record(project.id, "hash-0"), &audit).await,
        "an API key with this hash already exists",
    );
    assert_reference(
        db.create_api_key(&api_key_record(ProjectId::new(), "hash-x"), &audit).await,
        "the project does not exist",
    );

    assert_eq!(db.api_key(keys[0].id).await.unwrap(), Some(keys[0].clone()));
    assert_eq!(db.api_key_by_hash("hash-2").await.unwrap(), Some(keys[2].clone()));
    assert_eq!(db.api_key_by_hash("nope").await.unwrap(), None);
    let pages =
        all_pages(async |c| db.list_api_keys(project.id, c.as_ref(), limit(2)).await.unwrap())
            .await;
    assert_eq!(pages.concat(), keys);

    let revoke = event("key.revoke", "api_key", keys[1].id);
    let first = db.revoke_api_key(keys[1].id, ts(2_000_000_000_000), &revoke).await.unwrap();
    assert_eq!(first.unwrap().revoked_at, Some(ts(2_000_000_000_000)));
    let before = audit_count(db).await;
    let second = db.revoke_api_key(keys[1].id, ts(2_000_000_000_999), &revoke).await.unwrap();
    assert_eq!(second.unwrap().revoked_at, Some(ts(2_000_000_000_000)), "keeps the first");
    assert_eq!(audit_count(db).await, before, "a repeated revoke changes nothing");
    assert_eq!(
        db.api_key_by_hash("hash-1").await.unwrap().unwrap().revoked_at,
        Some(ts(2_000_000_000_000))
    );
    assert_eq!(db.revoke_api_key(ApiKeyId::new(), now(), &revoke).await.unwrap(), None);
}

async fn refresh_tokens_are_used_once_and_revoked_by_family(db: &TestDatabase) {
    let ada = new_user(db, "ada@example.com").await;
    let bob = new_user(db, "bob@example.com").await;
    let first = refresh_token(ada.id, "family-a", "h1");
    let second = refresh_token(ada.id, "family-a", "h2");
    let other_family = refresh_token(ada.id, "family-b", "h3");
    let bobs = refresh_token(bob.id, "family-c", "h4");
    for t in [&first, &second, &other_family, &bobs] {
        db.insert_refresh_token(t).await.unwrap();
    }
    assert_conflict(
        db.insert_refresh_token(&refresh_token(ada.id, "family-a", "h1")).await,
        "a refresh token with this id or hash already exists",
    );
    assert_reference(
        db.insert_refresh_token(&refresh_token(UserId::new(), "f", "h9")).await,
        "user does not exist",
    );
    assert_eq!(db.refresh_token_by_hash("h1").await.unwrap(), Some(first.clone()));
    assert_eq!(db.refresh_token_by_hash("zz").await.unwrap(), None);

    let at = ts(2_000_000_000_000);
    assert!(db.mark_refresh_token_used(&first.id, at).await.unwrap());
    assert!(!db.mark_refresh_token_used(&first.id, now()).await.unwrap(), "second use is reuse");
    assert_eq!(db.refresh_token_by_hash("h1").await.unwrap().unwrap().used_at, Some(at));
    assert!(!db.mark_refresh_token_used("no-such-token", now()).await.unwrap());

    // Concurrent uses of one token: exactly one wins.
    let wins = futures_join_all((0..8).map(|_| {
        let store = db.store().clone();
        let id = second.id.clone();
        tokio::spawn(async move { store.mark_refresh_token_used(&id, now()).await.unwrap() })
    }))
    .await;
    assert_eq!(wins.iter().filter(|w| **w).count(), 1);

    assert_eq!(db.revoke_refresh_family("family-a", at).await.unwrap(), 2);
    assert_eq!(db.revoke_refresh_family("family-a", now()).await.unwrap(), 0);
    assert_eq!(db.refresh_token_by_hash("h2").await.unwrap().unwrap().revoked_at, Some(at));
    assert!(db.refresh_token_by_hash("h3").await.unwrap().unwrap().revoked_at.is_none());

    let unused = refresh_token(ada.id, "family-d", "h5");
    db.insert_refresh_token(&unused).await.unwrap();
    assert_eq!(db.revoke_refresh_tokens_of_user(ada.id, at).await.unwrap(), 2);
    assert!(!db.mark_refresh_token_used(&unused.id, now()).await.unwrap(), "revoked");
    assert!(db.refresh_token_by_hash("h4").await.unwrap().unwrap().revoked_at.is_none());
}

async fn signing_keys_newest_first_and_retired_once(db: &TestDatabase) {
    let key = |kid: &str, created: i64| SigningKey {
        kid: kid.to_owned(),
        algorithm: "EdDSA".to_owned(),
        private_key_ciphertext: format!("secret-{kid}"),
        public_jwk: format!("{{\"kid\":\"{kid}\"}}"),
        created_at: ts(created),
        retired_at: None,
    };
    let old = key("old", 1_700_000_000_000);
    let new = key("new", 1_800_000_000_000);
    db.insert_signing_key(&old).await.unwrap();
    db.insert_signing_key(&new).await.unwrap();
    assert_conflict(
        db.insert_signing_key(&key("old", 1)).await,
        "a signing key with this kid already exists",
    );
    assert_eq!(db.signing_keys().await.unwrap(), vec![new.clone(), old.clone()]);

    let at = ts(1_900_000_000_000);
    assert!(db.retire_signing_key("old", at).await.unwrap());
    assert!(db.retire_signing_key("old", ts(1_950_000_000_000)).await.unwrap());
    assert!(!db.retire_signing_key("missing", at).await.unwrap());
    let keys = db.signing_keys().await.unwrap();
    assert_eq!(keys[1].retired_at, Some(at), "keeps the first");
    assert_eq!(keys[0].retired_at, None);
}

async fn every_change_is_audited_and_failed_changes_are_not(db: &TestDatabase) {
    let user = new_user(db, "ada@example.com").await;
    let project = new_project(db, "alpha", Some(user.id)).await;
    assert_eq!(audit_count(db).await, 2);

    // A failed change rolls back its audit record with it.
    let duplicate = user_record("ada@example.com");
    assert!(db.create_user(&duplicate, &event("user.create", "user", duplicate.id)).await.is_err());
    let same_name = project_record("alpha", None);
    let audit = event("project.create", "project", same_name.id);
    assert!(db.create_project(&same_name, None, &audit).await.is_err());
    assert_eq!(audit_count(db).await, 2);

    // Changes that find nothing to change record nothing.
    let audit = event("project.delete", "project", "missing");
    assert!(!db.delete_project(ProjectId::new(), &audit).await.unwrap());
    assert!(!db.remove_member(project.id, UserId::new(), &audit).await.unwrap());
    assert_eq!(audit_count(db).await, 2);

    let mut audit = event("project.member.remove", "project", project.id);
    audit.actor_id = Some(user.id);
    audit.actor = "ada@example.com".to_owned();
    audit.project_id = Some(project.id);
    audit.request_id = Some("req-42".to_owned());
    audit.details =
        serde_json::json!({"user_id": user.id, "nested": {"n": 1.5, "list": [1, "two"]}});
    assert!(db.remove_member(project.id, user.id, &audit).await.unwrap());
    let filter =
        AuditFilter { action: Some("project.member.remove".to_owned()), ..Default::default() };
    let page = db.list_audit(&filter, None, limit(10)).await.unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].event, audit);
    assert_eq!(page.items[0].seq, 3);
    let verification = db.verify_audit().await.unwrap();
    assert_eq!(verification.records_checked, 3);
    assert_eq!(verification.first_broken_seq, None);
}

async fn audit_list_filters_and_paginates(db: &TestDatabase) {
    let actor = UserId::new();
    let project = ProjectId::new();
    let mut appended = Vec::new();
    for i in 0..6_i64 {
        let mut e = event(if i % 2 == 0 { "login" } else { "logout" }, "session", i);
        e.at = ts(1_700_000_000_000 + i * 1000);
        if i < 3 {
            e.actor_id = Some(actor);
            e.actor = "ada@example.com".to_owned();
        }
        if i == 5 {
            e.project_id = Some(project);
        }
        let record = db.append_audit(&e).await.unwrap();
        assert_eq!(record.seq, i + 1);
        assert_eq!(record.event, e);
        let prev =
            appended.last().map_or(GENESIS_HASH.to_owned(), |r: &AuditRecord| r.hash.clone());
        assert_eq!(record.prev_hash, prev);
        assert_eq!(record.hash, audit_hash(record.seq, &e, &prev));
        appended.push(record);
    }

    let everything = AuditFilter::default();
    let pages =
        all_pages(async |c| db.list_audit(&everything, c.as_ref(), limit(4)).await.unwrap()).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 2]);
    assert_eq!(pages.concat(), appended);
    let first = db.list_audit(&everything, None, limit(4)).await.unwrap();
    assert_eq!(first.next_cursor, Some(Cursor::from_key("4")));

    let seqs = async |filter: AuditFilter| -> Vec<i64> {
        let page = db.list_audit(&filter, None, limit(50)).await.unwrap();
        page.items.iter().map(|r| r.seq).collect()
    };
    assert_eq!(seqs(AuditFilter { actor_id: Some(actor), ..Default::default() }).await, [1, 2, 3]);
    assert_eq!(
        seqs(AuditFilter { action: Some("logout".into()), ..Default::default() }).await,
        [2, 4, 6]
    );
    assert_eq!(
        seqs(AuditFilter {
            resource_type: Some("session".into()),
            resource_id: Some("4".into()),
            ..Default::default()
        })
        .await,
        [5]
    );
    assert_eq!(seqs(AuditFilter { project_id: Some(project), ..Default::default() }).await, [6]);
    assert_eq!(
        seqs(AuditFilter {
            since: Some(ts(1_700_000_002_000)),
            until: Some(ts(1_700_000_004_000)),
            ..Default::default()
        })
        .await,
        [3, 4]
    );
    assert_eq!(
        seqs(AuditFilter {
            actor_id: Some(actor),
            action: Some("login".into()),
            ..Default::default()
        })
        .await,
        [1, 3]
    );
    // A cursor this list never issued yields nothing rather than an error.
    let odd = db.list_audit(&everything, Some(&Cursor::parse("abc").unwrap()), limit(5)).await;
    assert!(odd.unwrap().items.is_empty());
}

async fn append_some(store: &Store, n: usize) {
    for i in 0..n {
        let mut e = event("test.event", "thing", i);
        e.details = serde_json::json!({"i": i});
        store.append_audit(&e).await.unwrap();
    }
}

async fn audit_verify_detects_a_changed_field(db: &TestDatabase) {
    append_some(db, 5).await;
    assert_eq!(db.verify_audit().await.unwrap().first_broken_seq, None);
    db.execute_raw("UPDATE audit_log SET actor = 'mallory' WHERE seq = 3").await.unwrap();
    let v = db.verify_audit().await.unwrap();
    assert_eq!(v.first_broken_seq, Some(3));
    assert!(v.reason.unwrap().contains("changed"));

    // Restoring the field restores the chain; changing the details text breaks it again.
    db.execute_raw("UPDATE audit_log SET actor = 'system' WHERE seq = 3").await.unwrap();
    assert_eq!(db.verify_audit().await.unwrap().first_broken_seq, None);
    db.execute_raw("UPDATE audit_log SET details = '{\"i\":40}' WHERE seq = 4").await.unwrap();
    assert_eq!(db.verify_audit().await.unwrap().first_broken_seq, Some(4));
}

async fn audit_verify_detects_a_deleted_record(db: &TestDatabase) {
    append_some(db, 5).await;
    db.execute_raw("DELETE FROM audit_log WHERE seq = 2").await.unwrap();
    let v = db.verify_audit().await.unwrap();
    assert_eq!(v.first_broken_seq, Some(2));
    assert!(v.reason.unwrap().contains("missing"));

    // Even a record whose seq is renumbered to close the gap no longer links.
    db.execute_raw("UPDATE audit_log SET seq = seq - 1 WHERE seq > 2").await.unwrap();
    let v = db.verify_audit().await.unwrap();
    assert_eq!(v.first_broken_seq, Some(2));
}

async fn audit_verify_detects_a_truncated_tail(db: &TestDatabase) {
    append_some(db, 5).await;
    db.execute_raw("DELETE FROM audit_log WHERE seq >= 4").await.unwrap();
    let v = db.verify_audit().await.unwrap();
    assert_eq!(v.records_checked, 3);
    assert_eq!(v.first_broken_seq, Some(4));
    assert!(v.reason.unwrap().contains("removed from the end"));

    // Emptying the whole log is caught too.
    db.execute_raw("DELETE FROM audit_log").await.unwrap();
    assert_eq!(db.verify_audit().await.unwrap().first_broken_seq, Some(1));
}

async fn concurrent_appenders_keep_the_chain_unbroken(db: &TestDatabase) {
    const TASKS: usize = 8;
    const EACH: usize = 10;
    let tasks = (0..TASKS).map(|_| {
        let store = db.store().clone();
        tokio::spawn(async move { append_some(&store, EACH).await })
    });
    futures_join_all(tasks).await;
    // Audited changes from several tasks interleave with plain appends on the same chain.
    let creators = (0..4).map(|i| {
        let store = db.store().clone();
        tokio::spawn(async move {
            let model = model_record(&format!("model-{i}"));
            store.create_model(&model, &event("model.create", "model", model.id)).await.unwrap();
        })
    });
    futures_join_all(creators).await;

    let v = db.verify_audit().await.unwrap();
    assert_eq!(v.first_broken_seq, None, "{:?}", v.reason);
    assert_eq!(v.records_checked, (TASKS * EACH + 4) as i64);
    let seqs: Vec<i64> = all_pages(async |c| {
        db.list_audit(&AuditFilter::default(), c.as_ref(), limit(200)).await.unwrap()
    })
    .await
    .concat()
    .iter()
    .map(|r| r.seq)
    .collect();
    assert_eq!(seqs, (1..=(TASKS * EACH + 4) as i64).collect::<Vec<_>>());
}

async fn corrupt_rows_are_reported_as_corrupt(db: &TestDatabase) {
    let user = new_user(db, "ada@example.com").await;
    db.execute_raw(&format!("UPDATE users SET role = 'wizard' WHERE id = '{}'", user.id))
        .await
        .unwrap();
    match db.user(user.id).await {
        Err(StoreError::Corrupt(why)) => assert!(why.contains("users.role"), "{why}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(matches!(db.list_users(None, limit(5)).await, Err(StoreError::Corrupt(_))));
}

/// Another connection holds the write lock (SQLite) or the audit head's row lock (PostgreSQL);
/// a store with a short statement timeout gives up with Unavailable instead of hanging.
async fn a_locked_database_is_unavailable(db: &TestDatabase) {
    let mut holder = hold_write_lock(db).await;

    let impatient = Store::connect(&StoreConfig {
        statement_timeout: Duration::from_millis(200),
        ..db.config().clone()
    })
    .await
    .unwrap();
    let result = impatient.append_audit(&event("test.event", "thing", 1)).await;
    assert!(matches!(result, Err(StoreError::Unavailable(_))), "got {result:?}");
    impatient.close().await;

    sqlx::raw_sql("ROLLBACK").execute(&mut holder).await.unwrap();
    holder.close().await.unwrap();
    db.append_audit(&event("test.event", "thing", 2)).await.unwrap();
}

/// With its only connection stuck behind a lock, the pool turns callers away after the acquire
/// timeout instead of queueing them.
async fn a_saturated_pool_fails_fast(db: &TestDatabase) {
    let mut holder = hold_write_lock(db).await;
    let store = Store::connect(&StoreConfig {
        max_connections: 1,
        acquire_timeout: Duration::from_millis(200),
        statement_timeout: Duration::from_secs(10),
        ..db.config().clone()
    })
    .await
    .unwrap();
    let stuck = {
        let store = store.clone();
        tokio::spawn(async move { store.append_audit(&event("test.event", "thing", 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let result = store.ping().await;
    assert!(matches!(result, Err(StoreError::Unavailable(_))), "got {result:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "fails fast");

    sqlx::raw_sql("ROLLBACK").execute(&mut holder).await.unwrap();
    stuck.await.unwrap().unwrap();
    store.ping().await.unwrap();
    store.close().await;
}

async fn a_closed_pool_is_unavailable(db: &TestDatabase) {
    let store = Store::connect(db.config()).await.unwrap();
    store.ping().await.unwrap();
    store.close().await;
    assert!(matches!(store.ping().await, Err(StoreError::Unavailable(_))));
    assert!(matches!(store.count_users().await, Err(StoreError::Unavailable(_))));
}

#[tokio::test]
async fn an_unreachable_postgres_is_unavailable() {
    let config = StoreConfig {
        url: "postgres://postgres@127.0.0.1:1/bud".to_owned(),
        acquire_timeout: Duration::from_secs(1),
        ..StoreConfig::default()
    };
    let started = std::time::Instant::now();
    let result = Store::connect(&config).await;
    assert!(matches!(result, Err(StoreError::Unavailable(_))), "got {result:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "fails fast");
}

#[tokio::test]
async fn sqlite_directories_are_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/deeper/bud.db");
    let config =
        StoreConfig { url: format!("sqlite://{}", path.display()), ..StoreConfig::default() };
    let store = Store::connect(&config).await.unwrap();
    store.migrate().await.unwrap();
    store.ping().await.unwrap();
    store.close().await;
    assert!(path.exists());
}

#[tokio::test]
async fn unknown_url_schemes_are_rejected() {
    let config = StoreConfig { url: "mysql://localhost/bud".to_owned(), ..StoreConfig::default() };
    assert!(matches!(Store::connect(&config).await, Err(StoreError::Database(_))));
}

/// A connection of its own that holds what every audited write needs: SQLite's write lock, or
/// PostgreSQL's lock on the audit head. `ROLLBACK` on it releases the lock.
async fn hold_write_lock(db: &TestDatabase) -> sqlx::AnyConnection {
    sqlx::any::install_default_drivers();
    let mut holder = sqlx::AnyConnection::connect(&db.config().url).await.unwrap();
    let lock = match db.backend() {
        Backend::Sqlite => "BEGIN IMMEDIATE",
        Backend::Postgres => "BEGIN; SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE",
    };
    sqlx::raw_sql(lock).execute(&mut holder).await.unwrap();
    holder
}

/// Awaits every task, failing the test if one panicked.
async fn futures_join_all<T>(
    tasks: impl IntoIterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    // Collect first: the iterators above spawn lazily, and every task must be running before the
    // first is awaited.
    let tasks: Vec<_> = tasks.into_iter().collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Clusters, endpoints and leases

fn cluster_record(cluster_name: &str, kind: ClusterKind) -> Cluster {
    let kubeconfig = match kind {
        ClusterKind::Local => String::new(),
        ClusterKind::Kubernetes => format!("sealed-kubeconfig-{cluster_name}"),
    };
    Cluster {
        id: ClusterId::new(),
        name: name(cluster_name),
        kind,
        kubeconfig_ciphertext: kubeconfig,
        namespace: DEFAULT_WORKLOADS_NAMESPACE.to_owned(),
        status: ClusterStatus::Registering,
        reason: String::new(),
        consecutive_failures: 0,
        last_checked_at: None,
        inventory: None,
        created_by: None,
        created_at: now(),
        updated_at: now(),
    }
}

async fn new_cluster(store: &Store, cluster_name: &str) -> Cluster {
    let cluster = cluster_record(cluster_name, ClusterKind::Kubernetes);
    store.create_cluster(&cluster, &event("cluster.create", "cluster", cluster.id)).await.unwrap();
    cluster
}

async fn new_model(store: &Store, model_name: &str) -> Model {
    let model = model_record(model_name);
    store.create_model(&model, &event("model.create", "model", model.id)).await.unwrap();
    model
}

fn endpoint_record(project: ProjectId, model: ModelId, cluster: ClusterId, n: &str) -> Endpoint {
    Endpoint {
        id: EndpointId::new(),
        project_id: project,
        model_id: model,
        cluster_id: cluster,
        name: name(n),
        replicas: 2,
        min_replicas: 1,
        engine_args: vec!["--max-model-len".to_owned(), "4096".to_owned()],
        gpus_per_replica: 1,
        deployment_timeout_secs: 600,
        status: EndpointStatus::Pending,
        reason: None,
        reason_detail: String::new(),
        status_since: now(),
        ready_replicas: 0,
        addresses: vec![],
        generation: 1,
        created_by: None,
        created_at: now(),
        updated_at: now(),
    }
}

async fn new_endpoint(store: &Store, endpoint: &Endpoint) {
    let audit = event("endpoint.create", "endpoint", endpoint.id);
    store.create_endpoint(endpoint, &audit).await.unwrap();
}

/// A project, a model and a cluster to deploy on.
async fn deployment_target(store: &Store) -> (Project, Model, Cluster) {
    let project = new_project(store, "alpha", None).await;
    let model = new_model(store, "llama").await;
    let cluster = new_cluster(store, "gpu-east").await;
    (project, model, cluster)
}

fn probe(status: ClusterStatus, failures: i64, at: i64) -> ProbeRecord {
    ProbeRecord {
        status,
        reason: if status == ClusterStatus::Available { String::new() } else { "refused".into() },
        consecutive_failures: failures,
        inventory: Some(Inventory {
            nodes: 2,
            gpus_total: 8,
            gpus_allocatable: 6,
            device_plugin_running: true,
        }),
        checked_at: ts(at),
    }
}

fn change(from: EndpointStatus, to: EndpointStatus, at: i64, message: &str) -> StatusChange {
    StatusChange {
        from,
        to,
        reason: None,
        reason_detail: String::new(),
        at: ts(at),
        message: message.to_owned(),
    }
}

/// Each event's (from, to) statuses, newest first.
async fn cluster_history(
    store: &Store,
    id: ClusterId,
) -> Vec<(Option<ClusterStatus>, ClusterStatus)> {
    let events = store.cluster_events(id, 100).await.unwrap();
    events.iter().map(|e| (e.from_status, e.to_status)).collect()
}

async fn clusters_round_trip_paginate_and_conflict(db: &TestDatabase) {
    let ada = new_user(db, "ada@example.com").await;
    let local = cluster_record("local", ClusterKind::Local);
    db.create_cluster(&local, &event("cluster.create", "cluster", local.id)).await.unwrap();
    let mut probed = cluster_record("gpu-west", ClusterKind::Kubernetes);
    probed.status = ClusterStatus::NotAvailable;
    probed.reason = "connection refused".to_owned();
    probed.consecutive_failures = 2;
    probed.last_checked_at = Some(ts(1_900_000_000_000));
    probed.inventory = Some(Inventory { nodes: 1, gpus_total: 4, ..Inventory::default() });
    probed.created_by = Some(ada.id);
    probed.namespace = "team-a".to_owned();
    db.create_cluster(&probed, &event("cluster.create", "cluster", probed.id)).await.unwrap();
    let east = new_cluster(db, "gpu-east").await;
    assert_eq!(audit_count(db).await, 4);

    assert_eq!(db.cluster(local.id).await.unwrap(), Some(local.clone()));
    assert_eq!(db.cluster(probed.id).await.unwrap(), Some(probed.clone()));
    assert_eq!(db.cluster(ClusterId::new()).await.unwrap(), None);
    assert_eq!(db.cluster_by_name("gpu-east").await.unwrap(), Some(east.clone()));
    assert_eq!(db.cluster_by_name("nowhere").await.unwrap(), None);

    let mut expected = vec![local.clone(), probed.clone(), east.clone()];
    expected.sort_by_key(|c| c.id.to_string());
    let pages = all_pages(async |c| db.list_clusters(c.as_ref(), limit(2)).await.unwrap()).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 1]);
    assert_eq!(pages.concat(), expected);
    assert_eq!(db.all_clusters().await.unwrap(), expected);

    // Creation is the first event of a cluster's history.
    let events = db.cluster_events(probed.id, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].cluster_id, probed.id);
    assert_eq!(events[0].from_status, None);
    assert_eq!(events[0].to_status, ClusterStatus::NotAvailable);
    assert_eq!(events[0].at, probed.created_at);

    let again = cluster_record("gpu-east", ClusterKind::Kubernetes);
    let audit = event("cluster.create", "cluster", again.id);
    assert_conflict(
        db.create_cluster(&again, &audit).await,
        "a cluster with this name already exists",
    );
    let mut orphan = cluster_record("orphan", ClusterKind::Local);
    orphan.created_by = Some(UserId::new());
    let audit = event("cluster.create", "cluster", orphan.id);
    assert_reference(db.create_cluster(&orphan, &audit).await, "the creator does not exist");
    assert!(db.cluster_events(orphan.id, 10).await.unwrap().is_empty(), "rolled back");
    assert_eq!(audit_count(db).await, 4);

    db.execute_raw(&format!("UPDATE clusters SET inventory = '[1' WHERE id = '{}'", east.id))
        .await
        .unwrap();
    match db.cluster(east.id).await {
        Err(StoreError::Corrupt(why)) => assert!(why.contains("clusters.inventory"), "{why}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    db.execute_raw(&format!("UPDATE clusters SET kind = 'docker' WHERE id = '{}'", local.id))
        .await
        .unwrap();
    assert!(matches!(db.all_clusters().await, Err(StoreError::Corrupt(_))));
}

async fn cluster_probes_are_compare_and_set(db: &TestDatabase) {
    let cluster = new_cluster(db, "gpu-east").await;
    let audits = audit_count(db).await;
    use ClusterStatus::*;

    let found = probe(Available, 0, 1_900_000_000_000);
    assert!(db.record_probe(cluster.id, Registering, &found).await.unwrap());
    let after = db.cluster(cluster.id).await.unwrap().unwrap();
    assert_eq!(after.status, Available);
    assert_eq!(after.inventory, found.inventory);
    assert_eq!(after.last_checked_at, Some(ts(1_900_000_000_000)));
    assert_eq!(after.updated_at, ts(1_900_000_000_000));
    assert_eq!(after.kubeconfig_ciphertext, cluster.kubeconfig_ciphertext);
    assert_eq!(
        cluster_history(db, cluster.id).await,
        [(Some(Registering), Available), (None, Registering)]
    );

    // A stale expectation (a user refreshed or deleted meanwhile) writes nothing.
    let writes = db.writes();
    let stale = probe(NotAvailable, 1, 1_900_000_001_000);
    assert!(!db.record_probe(cluster.id, Registering, &stale).await.unwrap());
    assert!(!db.record_probe(ClusterId::new(), Available, &stale).await.unwrap());
    assert_eq!(db.cluster(cluster.id).await.unwrap().unwrap(), after);
    assert_eq!(db.cluster_events(cluster.id, 10).await.unwrap().len(), 2);
    assert_eq!(db.writes(), writes + 2, "two compare-and-set updates ran, and nothing else");

    // The same status with new findings: applied, but no event.
    let mut grown = probe(Available, 0, 1_900_000_002_000);
    grown.inventory = Some(Inventory {
        nodes: 3,
        gpus_total: 12,
        gpus_allocatable: 12,
        device_plugin_running: true,
    });
    assert!(db.record_probe(cluster.id, Available, &grown).await.unwrap());
    assert_eq!(db.cluster(cluster.id).await.unwrap().unwrap().inventory, grown.inventory);
    assert_eq!(db.cluster_events(cluster.id, 10).await.unwrap().len(), 2);

    let lost = ProbeRecord { inventory: None, ..probe(NotAvailable, 1, 1_900_000_003_000) };
    assert!(db.record_probe(cluster.id, Available, &lost).await.unwrap());
    let now_lost = db.cluster(cluster.id).await.unwrap().unwrap();
    assert_eq!((now_lost.status, now_lost.consecutive_failures), (NotAvailable, 1));
    assert_eq!(now_lost.reason, "refused");
    assert_eq!(now_lost.inventory, None, "stored as given");

    let events = db.cluster_events(cluster.id, 2).await.unwrap();
    assert_eq!(events.len(), 2, "limited");
    assert_eq!((events[0].from_status, events[0].to_status), (Some(Available), NotAvailable));
    assert_eq!(events[0].reason, "refused");
    assert_eq!(events[0].at, ts(1_900_000_003_000));
    assert_eq!(events[1].to_status, Available);
    assert_eq!(audit_count(db).await, audits, "the system observing is not audited");
}

async fn user_cluster_changes_are_audited_and_recorded(db: &TestDatabase) {
    use ClusterStatus::*;
    let cluster = new_cluster(db, "gpu-east").await;
    assert!(
        db.record_probe(cluster.id, Registering, &probe(Error, 5, 1_900_000_000_000))
            .await
            .unwrap()
    );
    let audits = audit_count(db).await;
    let audit = event("cluster.refresh", "cluster", cluster.id);

    let at = ts(1_900_000_001_000);
    assert!(
        !db.set_cluster_status(cluster.id, Available, Registering, "", at, &audit).await.unwrap()
    );
    assert!(
        !db.set_cluster_status(ClusterId::new(), Error, Registering, "", at, &audit).await.unwrap()
    );
    assert_eq!(audit_count(db).await, audits, "nothing applied, nothing audited");
    assert!(
        db.set_cluster_status(cluster.id, Error, Registering, "refresh requested", at, &audit)
            .await
            .unwrap()
    );
    assert_eq!(audit_count(db).await, audits + 1);
    let refreshed = db.cluster(cluster.id).await.unwrap().unwrap();
    assert_eq!(refreshed.status, Registering);
    assert_eq!(refreshed.reason, "refresh requested");
    assert_eq!(refreshed.consecutive_failures, 0);
    assert_eq!(refreshed.updated_at, at);
    let last = &db.cluster_events(cluster.id, 1).await.unwrap()[0];
    assert_eq!((last.from_status, last.to_status), (Some(Error), Registering));
    assert_eq!(last.reason, "refresh requested");

    // The prober's finding about the cluster before the refresh loses to the user.
    assert!(
        !db.record_probe(cluster.id, Error, &probe(Error, 6, 1_900_000_001_500)).await.unwrap()
    );
    assert_eq!(db.cluster(cluster.id).await.unwrap().unwrap(), refreshed);

    // A new kubeconfig starts the registration over from any live status.
    assert!(
        db.record_probe(cluster.id, Registering, &probe(NotAvailable, 2, 1_900_000_002_000))
            .await
            .unwrap()
    );
    let audit = event("cluster.kubeconfig", "cluster", cluster.id);
    let at = ts(1_900_000_003_000);
    let replaced = db.set_cluster_kubeconfig(cluster.id, "new-sealed", at, &audit).await.unwrap();
    let replaced = replaced.unwrap();
    assert_eq!(replaced.kubeconfig_ciphertext, "new-sealed");
    assert_eq!((replaced.status, replaced.reason.as_str()), (Registering, ""));
    assert_eq!(replaced.consecutive_failures, 0);
    assert_eq!(replaced.updated_at, at);
    assert_eq!(db.cluster(cluster.id).await.unwrap(), Some(replaced));
    let last = &db.cluster_events(cluster.id, 1).await.unwrap()[0];
    assert_eq!((last.from_status, last.to_status, last.at), (Some(NotAvailable), Registering, at));
    assert_eq!(audit_count(db).await, audits + 2);
    assert_eq!(db.set_cluster_kubeconfig(ClusterId::new(), "x", at, &audit).await.unwrap(), None);

    // A deletion under way is not undone by a new kubeconfig.
    let delete = event("cluster.delete", "cluster", cluster.id);
    assert!(
        db.set_cluster_status(cluster.id, Registering, Deleting, "deleted by ada", at, &delete)
            .await
            .unwrap()
    );
    assert_eq!(db.set_cluster_kubeconfig(cluster.id, "late", at, &audit).await.unwrap(), None);
    let deleting = db.cluster(cluster.id).await.unwrap().unwrap();
    assert_eq!(
        (deleting.status, deleting.kubeconfig_ciphertext.as_str()),
        (Deleting, "new-sealed")
    );
    assert_eq!(audit_count(db).await, audits + 3);
    assert_eq!(cluster_history(db, cluster.id).await.len(), 6);
}

async fn deleting_what_endpoints_use_is_refused(db: &TestDatabase) {
    let (project, model, cluster) = deployment_target(db).await;
    let endpoint = endpoint_record(project.id, model.id, cluster.id, "chat");
    new_endpoint(db, &endpoint).await;
    let audits = audit_count(db).await;

    let audit = event("delete", "thing", "x");
    assert_reference(
        db.delete_project(project.id, &audit).await,
        "the project still has endpoints; delete them first",
    );
    assert_reference(db.delete_model(model.id, &audit).await, "endpoints still serve this model");
    assert_reference(
        db.delete_cluster(cluster.id, &audit).await,
        "endpoints still run on this cluster",
    );
    assert_eq!(audit_count(db).await, audits, "refused deletes are not audited");
    assert!(db.project(project.id).await.unwrap().is_some());
    assert!(db.model(model.id).await.unwrap().is_some());
    assert!(db.cluster(cluster.id).await.unwrap().is_some());
    assert_eq!(db.endpoint(endpoint.id).await.unwrap(), Some(endpoint.clone()));

    assert!(db.delete_endpoint(endpoint.id, &audit).await.unwrap());
    assert!(!db.delete_endpoint(endpoint.id, &audit).await.unwrap());
    assert!(db.endpoint_events(endpoint.id, 10).await.unwrap().is_empty(), "events cascade");
    assert_eq!(db.count_endpoints_on_cluster(cluster.id).await.unwrap(), 0);
    assert!(db.delete_cluster(cluster.id, &audit).await.unwrap());
    assert!(!db.delete_cluster(cluster.id, &audit).await.unwrap());
    assert!(db.cluster_events(cluster.id, 10).await.unwrap().is_empty(), "events cascade");
    assert!(db.delete_model(model.id, &audit).await.unwrap());
    assert!(db.delete_project(project.id, &audit).await.unwrap());
    assert_eq!(audit_count(db).await, audits + 4);
}

async fn endpoints_round_trip_paginate_and_follow_visibility(db: &TestDatabase) {
    let ada = new_user(db, "ada@example.com").await;
    let bob = new_user(db, "bob@example.com").await;
    let mine = new_project(db, "mine", Some(ada.id)).await;
    let granted = new_project(db, "granted", None).await;
    let hidden = new_project(db, "hidden", Some(bob.id)).await;
    let grant = GrantRecord {
        id: GrantId::new(),
        user_id: ada.id,
        grant: Grant::new(perm("endpoint:view"), Some(granted.id)).unwrap(),
        granted_by: None,
        created_at: now(),
    };
    db.grant(&grant, &event("grant.create", "user", ada.id)).await.unwrap();
    let model = new_model(db, "llama").await;
    let cluster = new_cluster(db, "gpu-east").await;
    let idle = new_cluster(db, "gpu-west").await;

    let mut all = Vec::new();
    for (project, n) in [(&mine, 3), (&granted, 1), (&hidden, 2)] {
        for i in 0..n {
            let mut endpoint = endpoint_record(project.id, model.id, cluster.id, &format!("e{i}"));
            endpoint.created_by = Some(ada.id);
            if i == 1 {
                endpoint.status = EndpointStatus::Error;
                endpoint.reason = Some(FailureReason::InsufficientGpus);
                endpoint.reason_detail = "0/2 nodes are available".to_owned();
                endpoint.engine_args = Vec::new();
                endpoint.generation = 7;
                endpoint.ready_replicas = 1;
            }
            new_endpoint(db, &endpoint).await;
            all.push(endpoint);
        }
    }
    for endpoint in &all {
        assert_eq!(db.endpoint(endpoint.id).await.unwrap().as_ref(), Some(endpoint));
    }
    assert_eq!(db.endpoint(EndpointId::new()).await.unwrap(), None);
    let created = db.endpoint_events(all[0].id, 10).await.unwrap();
    assert_eq!(created.len(), 1);
    assert_eq!((created[0].kind.as_str(), created[0].message.as_str()), ("info", "created"));
    assert_eq!(created[0].at, all[0].created_at);

    let sorted = |mut v: Vec<Endpoint>| {
        v.sort_by_key(|e| e.id.to_string());
        v
    };
    let in_project =
        |p: ProjectId| sorted(all.iter().filter(|e| e.project_id == p).cloned().collect());

    let pages =
        all_pages(async |c| db.list_endpoints(None, None, c.as_ref(), limit(4)).await.unwrap())
            .await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 2]);
    assert_eq!(pages.concat(), sorted(all.clone()));
    let of_mine = all_pages(async |c| {
        db.list_endpoints(Some(mine.id), None, c.as_ref(), limit(2)).await.unwrap()
    })
    .await
    .concat();
    assert_eq!(of_mine, in_project(mine.id));

    let visible = all_pages(async |c| {
        db.list_endpoints(None, Some(ada.id), c.as_ref(), limit(1)).await.unwrap()
    })
    .await
    .concat();
    let mut expected = in_project(mine.id);
    expected.extend(in_project(granted.id));
    assert_eq!(visible, sorted(expected));
    let page = db.list_endpoints(Some(granted.id), Some(ada.id), None, limit(10)).await.unwrap();
    assert_eq!(page.items, in_project(granted.id));
    let page = db.list_endpoints(Some(hidden.id), Some(ada.id), None, limit(10)).await.unwrap();
    assert!(page.items.is_empty());
    let page = db.list_endpoints(None, Some(bob.id), None, limit(10)).await.unwrap();
    assert_eq!(page.items, in_project(hidden.id));

    assert_eq!(db.endpoints_on_cluster(cluster.id).await.unwrap(), sorted(all.clone()));
    assert_eq!(db.count_endpoints_on_cluster(cluster.id).await.unwrap(), 6);
    assert!(db.endpoints_on_cluster(idle.id).await.unwrap().is_empty());
    assert_eq!(db.count_endpoints_on_cluster(idle.id).await.unwrap(), 0);

    db.execute_raw(&format!("UPDATE endpoints SET reason = 'bad luck' WHERE id = '{}'", all[1].id))
        .await
        .unwrap();
    match db.endpoint(all[1].id).await {
        Err(StoreError::Corrupt(why)) => assert!(why.contains("endpoints.reason"), "{why}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

async fn endpoint_conflicts_and_references(db: &TestDatabase) {
    let (project, model, cluster) = deployment_target(db).await;
    let other = new_project(db, "beta", None).await;
    new_endpoint(db, &endpoint_record(project.id, model.id, cluster.id, "chat")).await;
    // The same name in another project is fine.
    new_endpoint(db, &endpoint_record(other.id, model.id, cluster.id, "chat")).await;
    let audits = audit_count(db).await;

    let audit = event("endpoint.create", "endpoint", "x");
    let twin = endpoint_record(project.id, model.id, cluster.id, "chat");
    assert_conflict(
        db.create_endpoint(&twin, &audit).await,
        "an endpoint with this name already exists in the project",
    );
    const MISSING: &str = "the project, model or cluster does not exist";
    for endpoint in [
        endpoint_record(ProjectId::new(), model.id, cluster.id, "a"),
        endpoint_record(project.id, ModelId::new(), cluster.id, "b"),
        endpoint_record(project.id, model.id, ClusterId::new(), "c"),
    ] {
        assert_reference(db.create_endpoint(&endpoint, &audit).await, MISSING);
        assert_eq!(db.endpoint(endpoint.id).await.unwrap(), None);
        assert!(db.endpoint_events(endpoint.id, 10).await.unwrap().is_empty(), "rolled back");
    }
    assert_eq!(audit_count(db).await, audits);
    assert_eq!(db.count_endpoints_on_cluster(cluster.id).await.unwrap(), 2);
}

async fn update_endpoint_bumps_the_generation(db: &TestDatabase) {
    let (project, model, cluster) = deployment_target(db).await;
    let endpoint = endpoint_record(project.id, model.id, cluster.id, "chat");
    new_endpoint(db, &endpoint).await;
    let audits = audit_count(db).await;
    let audit = event("endpoint.scale", "endpoint", endpoint.id);

    let at = ts(1_900_000_000_000);
    let patch = EndpointPatch { replicas: Some(4), ..EndpointPatch::default() };
    let scaled = db.update_endpoint(endpoint.id, &patch, at, &audit).await.unwrap().unwrap();
    assert_eq!((scaled.replicas, scaled.min_replicas), (4, 1));
    assert_eq!(scaled.generation, endpoint.generation + 1);
    assert_eq!(scaled.updated_at, at);
    assert_eq!((scaled.status, scaled.status_since), (endpoint.status, endpoint.status_since));
    assert_eq!(db.endpoint(endpoint.id).await.unwrap(), Some(scaled.clone()));
    let last = &db.endpoint_events(endpoint.id, 1).await.unwrap()[0];
    assert_eq!((last.kind.as_str(), last.at), ("info", at));
    assert!(last.message.contains("replicas 4"), "{}", last.message);

    let patch = EndpointPatch { min_replicas: Some(3), replicas: None };
    let again = db.update_endpoint(endpoint.id, &patch, now(), &audit).await.unwrap().unwrap();
    assert_eq!(
        (again.replicas, again.min_replicas, again.generation),
        (4, 3, endpoint.generation + 2)
    );
    assert_eq!(audit_count(db).await, audits + 2);

    assert_eq!(db.update_endpoint(EndpointId::new(), &patch, now(), &audit).await.unwrap(), None);
    assert_eq!(audit_count(db).await, audits + 2);
    assert_eq!(db.endpoint_events(endpoint.id, 10).await.unwrap().len(), 3);
}

async fn transition_endpoint_is_compare_and_set(db: &TestDatabase) {
    use EndpointStatus::*;
    let (project, model, cluster) = deployment_target(db).await;
    let endpoint = endpoint_record(project.id, model.id, cluster.id, "chat");
    new_endpoint(db, &endpoint).await;
    let audits = audit_count(db).await;

    // The reconciler: no audit record, the generation stays.
    let deploy = change(Pending, Deploying, 1_900_000_000_000, "deploying 2 replicas");
    assert!(db.transition_endpoint(endpoint.id, &deploy, Some(1), None).await.unwrap());
    let deploying = db.endpoint(endpoint.id).await.unwrap().unwrap();
    assert_eq!(deploying.status, Deploying);
    assert_eq!(deploying.status_since, ts(1_900_000_000_000));
    assert_eq!(deploying.updated_at, ts(1_900_000_000_000));
    assert_eq!(deploying.generation, 1);
    assert_eq!(audit_count(db).await, audits);
    let last = &db.endpoint_events(endpoint.id, 1).await.unwrap()[0];
    assert_eq!((last.kind.as_str(), last.message.as_str()), ("status", "deploying 2 replicas"));
    assert_eq!(last.at, ts(1_900_000_000_000));

    // A decision taken in a status that no longer holds is dropped.
    assert!(!db.transition_endpoint(endpoint.id, &deploy, None, None).await.unwrap());
    assert!(!db.transition_endpoint(EndpointId::new(), &deploy, None, None).await.unwrap());
    assert_eq!(db.endpoint(endpoint.id).await.unwrap().unwrap(), deploying);
    assert_eq!(db.endpoint_events(endpoint.id, 10).await.unwrap().len(), 2);

    // So is one taken on an older spec.
    let scale = EndpointPatch { replicas: Some(3), ..EndpointPatch::default() };
    let audit = event("endpoint.scale", "endpoint", endpoint.id);
    let scaled = db.update_endpoint(endpoint.id, &scale, now(), &audit).await.unwrap().unwrap();
    assert_eq!(scaled.generation, 2);
    let mut timeout = change(Deploying, Error, 1_900_000_600_000, "not ready in time");
    timeout.reason = Some(FailureReason::Timeout);
    timeout.reason_detail = "1/3 ready after 600s".to_owned();
    assert!(!db.transition_endpoint(endpoint.id, &timeout, Some(1), None).await.unwrap());
    assert_eq!(db.endpoint(endpoint.id).await.unwrap().unwrap(), scaled);
    assert!(db.transition_endpoint(endpoint.id, &timeout, Some(2), None).await.unwrap());
    let failed = db.endpoint(endpoint.id).await.unwrap().unwrap();
    assert_eq!((failed.status, failed.reason), (Error, Some(FailureReason::Timeout)));
    assert_eq!(failed.reason_detail, "1/3 ready after 600s");
    assert_eq!(failed.status_since, ts(1_900_000_600_000));
    assert_eq!(failed.generation, 2);
    assert_eq!(audit_count(db).await, audits + 1, "only the scale was audited");

    // A user command: audited, bumps the generation, clears the reason.
    let retry = change(Error, Deploying, 1_900_000_700_000, "retried by ada");
    let audit = event("endpoint.retry", "endpoint", endpoint.id);
    assert!(db.transition_endpoint(endpoint.id, &retry, None, Some(&audit)).await.unwrap());
    let retried = db.endpoint(endpoint.id).await.unwrap().unwrap();
    assert_eq!((retried.status, retried.reason), (Deploying, None));
    assert_eq!(retried.reason_detail, "");
    assert_eq!(retried.generation, 3);
    assert_eq!(audit_count(db).await, audits + 2);
    // A refused user command is not audited.
    assert!(!db.transition_endpoint(endpoint.id, &retry, None, Some(&audit)).await.unwrap());
    assert_eq!(audit_count(db).await, audits + 2);

    let messages: Vec<String> = db
        .endpoint_events(endpoint.id, 10)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "status")
        .map(|e| e.message)
        .collect();
    assert_eq!(messages, ["retried by ada", "not ready in time", "deploying 2 replicas"]);
}

async fn set_ready_replicas_writes_only_changes(db: &TestDatabase) {
    let (project, model, cluster) = deployment_target(db).await;
    let endpoint = endpoint_record(project.id, model.id, cluster.id, "chat");
    new_endpoint(db, &endpoint).await;
    let addrs = |list: &[&str]| list.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();

    let writes = db.writes();
    assert!(!db.set_ready_replicas(endpoint.id, 0, &[]).await.unwrap());
    assert!(!db.set_ready_replicas(EndpointId::new(), 3, &addrs(&["a:1"])).await.unwrap());
    assert_eq!(db.writes(), writes, "nothing new, nothing written");
    assert!(
        db.set_ready_replicas(endpoint.id, 2, &addrs(&["10.0.0.2:80", "10.0.0.1:80"]))
            .await
            .unwrap()
    );
    assert_eq!(db.writes(), writes + 1);
    let seen = db.endpoint(endpoint.id).await.unwrap().unwrap();
    assert_eq!(seen.ready_replicas, 2);
    assert_eq!(seen.addresses, addrs(&["10.0.0.1:80", "10.0.0.2:80"]), "stored sorted");
    assert_eq!(seen.updated_at, endpoint.updated_at, "an observation is not an update");
    assert!(
        !db.set_ready_replicas(endpoint.id, 2, &addrs(&["10.0.0.1:80", "10.0.0.2:80"]))
            .await
            .unwrap()
    );
    assert!(
        !db.set_ready_replicas(endpoint.id, 2, &addrs(&["10.0.0.2:80", "10.0.0.1:80"]))
            .await
            .unwrap(),
        "the same addresses in another order are no change"
    );
    assert_eq!(db.writes(), writes + 1);
    assert!(
        db.set_ready_replicas(endpoint.id, 2, &addrs(&["10.0.0.1:80", "10.0.0.3:80"]))
            .await
            .unwrap()
    );
    assert_eq!(db.writes(), writes + 2, "a replaced replica is a change of addresses alone");
    assert!(db.set_ready_replicas(endpoint.id, 1, &addrs(&["10.0.0.3:80"])).await.unwrap());
    let seen = db.endpoint(endpoint.id).await.unwrap().unwrap();
    assert_eq!((seen.ready_replicas, seen.addresses), (1, addrs(&["10.0.0.3:80"])));
    assert!(db.set_ready_replicas(endpoint.id, 0, &[]).await.unwrap());
    assert!(db.endpoint(endpoint.id).await.unwrap().unwrap().addresses.is_empty());
    assert_eq!(db.writes(), writes + 4);
}

async fn endpoint_events_are_listed_newest_first(db: &TestDatabase) {
    let (project, model, cluster) = deployment_target(db).await;
    let endpoint = endpoint_record(project.id, model.id, cluster.id, "chat");
    new_endpoint(db, &endpoint).await;
    let mut added = Vec::new();
    for (i, kind) in ["warning", "info", "warning"].into_iter().enumerate() {
        let e = EndpointEvent {
            id: uuid::Uuid::now_v7().to_string(),
            endpoint_id: endpoint.id,
            at: ts(4_000_000_000_000 + i as i64),
            kind: kind.to_owned(),
            message: format!("event {i}"),
        };
        db.add_endpoint_event(&e).await.unwrap();
        added.push(e);
    }
    // Two events in the same millisecond keep the order they were added in.
    let tie = EndpointEvent {
        id: uuid::Uuid::now_v7().to_string(),
        message: "event 3".to_owned(),
        ..added[2].clone()
    };
    db.add_endpoint_event(&tie).await.unwrap();
    added.push(tie);
    added.reverse();
    assert_eq!(db.endpoint_events(endpoint.id, 4).await.unwrap(), added);
    assert_eq!(db.endpoint_events(endpoint.id, 10).await.unwrap().len(), 5);
    assert_eq!(db.endpoint_events(endpoint.id, 10).await.unwrap()[4].message, "created");

    let stray = EndpointEvent { endpoint_id: EndpointId::new(), ..added[0].clone() };
    let stray = EndpointEvent { id: uuid::Uuid::now_v7().to_string(), ..stray };
    assert_reference(db.add_endpoint_event(&stray).await, "the endpoint does not exist");
}

async fn leases_have_one_holder_at_a_time(db: &TestDatabase) {
    const LEASE: &str = "cluster:gpu-east";
    let ttl = Duration::from_secs(10);
    let t = |s: i64| ts(1_900_000_000_000 + s * 1000);
    assert_eq!(db.lease_holder(LEASE, t(0)).await.unwrap(), None);

    assert!(db.try_acquire_lease(LEASE, "replica-a", t(0), ttl).await.unwrap());
    assert_eq!(db.lease_holder(LEASE, t(0)).await.unwrap().as_deref(), Some("replica-a"));
    assert!(!db.try_acquire_lease(LEASE, "replica-b", t(5), ttl).await.unwrap());
    assert_eq!(db.lease_holder(LEASE, t(5)).await.unwrap().as_deref(), Some("replica-a"));
    // Other names are independent.
    assert!(db.try_acquire_lease("cluster:gpu-west", "replica-b", t(5), ttl).await.unwrap());

    // The owner renews: the lease now runs to t(15).
    assert!(db.try_acquire_lease(LEASE, "replica-a", t(5), ttl).await.unwrap());
    assert!(!db.try_acquire_lease(LEASE, "replica-b", t(12), ttl).await.unwrap());
    assert_eq!(db.lease_holder(LEASE, t(14)).await.unwrap().as_deref(), Some("replica-a"));
    // Expired: free for anyone.
    assert_eq!(db.lease_holder(LEASE, t(15)).await.unwrap(), None);
    assert!(db.try_acquire_lease(LEASE, "replica-b", t(15), ttl).await.unwrap());
    assert_eq!(db.lease_holder(LEASE, t(16)).await.unwrap().as_deref(), Some("replica-b"));
    assert!(!db.try_acquire_lease(LEASE, "replica-a", t(16), ttl).await.unwrap());

    // Only the holder releases.
    db.release_lease(LEASE, "replica-a").await.unwrap();
    assert_eq!(db.lease_holder(LEASE, t(16)).await.unwrap().as_deref(), Some("replica-b"));
    db.release_lease(LEASE, "replica-b").await.unwrap();
    assert_eq!(db.lease_holder(LEASE, t(16)).await.unwrap(), None);
    assert!(db.try_acquire_lease(LEASE, "replica-a", t(16), ttl).await.unwrap());
    assert_eq!(
        db.lease_holder("cluster:gpu-west", t(6)).await.unwrap().as_deref(),
        Some("replica-b")
    );
}

async fn concurrent_acquirers_of_a_lease_one_wins(db: &TestDatabase) {
    for round in 0..3 {
        let lease = format!("cluster:{round}");
        let at = now();
        let wins = futures_join_all((0..8).map(|i| {
            let store = db.store().clone();
            let lease = lease.clone();
            tokio::spawn(async move {
                let holder = format!("replica-{i}");
                let won = store
                    .try_acquire_lease(&lease, &holder, at, Duration::from_secs(30))
                    .await
                    .unwrap();
                won.then_some(holder)
            })
        }))
        .await;
        let winners: Vec<String> = wins.into_iter().flatten().collect();
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        assert_eq!(db.lease_holder(&lease, at).await.unwrap().as_ref(), winners.first());
    }
}

async fn sealed_kubeconfigs_are_listed_and_resealable(db: &TestDatabase) {
    let provider = Provider {
        id: ProviderId::new(),
        name: name("openai"),
        base_url: "https://api.openai.com/v1".to_owned(),
        api_key_ciphertext: "sealed-api-key".to_owned(),
        created_by: None,
        created_at: now(),
        updated_at: now(),
    };
    db.create_provider(&provider, &event("provider.create", "provider", provider.id))
        .await
        .unwrap();
    let local = cluster_record("local", ClusterKind::Local);
    db.create_cluster(&local, &event("cluster.create", "cluster", local.id)).await.unwrap();
    let remote = new_cluster(db, "gpu-east").await;

    let secrets = db.sealed_secrets().await.unwrap();
    let kinds: Vec<_> = secrets.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, [SealedKind::ProviderApiKey, SealedKind::Kubeconfig], "local has none");
    let kubeconfig = secrets[1].clone();
    assert_eq!(kubeconfig.id, remote.id.to_string());
    assert_eq!(kubeconfig.ciphertext, remote.kubeconfig_ciphertext);

    let writes = db.writes();
    assert!(db.reseal(&kubeconfig, "resealed").await.unwrap());
    assert_eq!(db.writes(), writes + 1);
    assert_eq!(db.cluster(remote.id).await.unwrap().unwrap().kubeconfig_ciphertext, "resealed");
    // A ciphertext that changed since it was read is left alone.
    assert!(!db.reseal(&kubeconfig, "resealed-again").await.unwrap());
    let fresh = db.sealed_secrets().await.unwrap().remove(1);
    let audit = event("cluster.kubeconfig", "cluster", remote.id);
    db.set_cluster_kubeconfig(remote.id, "replaced", now(), &audit).await.unwrap().unwrap();
    assert!(!db.reseal(&fresh, "stale").await.unwrap());
    assert_eq!(db.cluster(remote.id).await.unwrap().unwrap().kubeconfig_ciphertext, "replaced");
}

/// What budcluster's reconciler reads on every pass, when nothing changed, leaves the writes
/// counter where it was: an idle control plane does not write to its database.
async fn a_reconcile_pass_that_changes_nothing_writes_nothing(db: &TestDatabase) {
    let (project, model, cluster) = deployment_target(db).await;
    let other = new_cluster(db, "gpu-west").await;
    let mut ids = Vec::new();
    for (i, on) in [cluster.id, cluster.id, other.id].into_iter().enumerate() {
        let endpoint = endpoint_record(project.id, model.id, on, &format!("e{i}"));
        new_endpoint(db, &endpoint).await;
        ids.push(endpoint.id);
    }
    let two = ["10.0.0.1:8000".to_owned(), "10.0.0.2:8000".to_owned()];
    assert!(db.set_ready_replicas(ids[0], 2, &two).await.unwrap());

    // Writes are counted per statement: an audited creation is its insert, its event and
    // the three statements that chain the audit record.
    let before = db.writes();
    let late = endpoint_record(project.id, model.id, other.id, "late");
    new_endpoint(db, &late).await;
    assert_eq!(db.writes(), before + 5);

    let writes = db.writes();
    for _ in 0..3 {
        for cluster in db.all_clusters().await.unwrap() {
            db.lease_holder(&format!("cluster:{}", cluster.id), now()).await.unwrap();
            db.count_endpoints_on_cluster(cluster.id).await.unwrap();
            db.cluster_events(cluster.id, 10).await.unwrap();
            for endpoint in db.endpoints_on_cluster(cluster.id).await.unwrap() {
                db.endpoint(endpoint.id).await.unwrap();
                db.endpoint_events(endpoint.id, 10).await.unwrap();
                let ready = endpoint.ready_replicas;
                let addresses = &endpoint.addresses;
                assert!(!db.set_ready_replicas(endpoint.id, ready, addresses).await.unwrap());
            }
        }
        db.list_endpoints(None, None, None, limit(50)).await.unwrap();
        db.list_clusters(None, limit(50)).await.unwrap();
        db.sealed_secrets().await.unwrap();
    }
    assert_eq!(db.writes(), writes, "reads never count");

    // A lease renewal is a write, counted once.
    assert!(db.try_acquire_lease("cluster:x", "me", now(), Duration::from_secs(5)).await.unwrap());
    assert_eq!(db.writes(), writes + 1);
    // Clones share the counter.
    let clone = db.store().clone();
    assert!(clone.set_ready_replicas(ids[1], 1, &two[..1]).await.unwrap());
    assert_eq!(db.writes(), writes + 2);
}

// ---------------------------------------------------------------------------------------------
// The gateway: routes, its configuration and version, usage

fn provider_record(provider_name: &str) -> Provider {
    Provider {
        id: ProviderId::new(),
        name: name(provider_name),
        base_url: format!("https://{provider_name}.example.com/v1"),
        api_key_ciphertext: format!("sealed-{provider_name}"),
        created_by: None,
        created_at: now(),
        updated_at: now(),
    }
}

fn route_record(project: ProjectId, route_name: &str, targets: Vec<RouteTarget>) -> Route {
    Route {
        id: RouteId::new(),
        project_id: project,
        name: name(route_name),
        targets,
        fallbacks: vec![],
        rpm_limit: None,
        tpm_limit: None,
        created_by: None,
        created_at: now(),
        updated_at: now(),
    }
}

fn to_endpoint(id: EndpointId, weight: u32) -> RouteTarget {
    RouteTarget { upstream: RouteUpstream::Endpoint(id), weight }
}

fn to_provider(id: ProviderId, model: &str, weight: u32) -> RouteTarget {
    RouteTarget { upstream: RouteUpstream::Provider { id, model: model.to_owned() }, weight }
}

async fn routes_round_trip_update_and_delete(db: &TestDatabase) {
    let (project, model, cluster) = deployment_target(db).await;
    let other = new_project(db, "beta", None).await;
    let endpoint = endpoint_record(project.id, model.id, cluster.id, "chat");
    new_endpoint(db, &endpoint).await;
    let openai = provider_record("openai");
    db.create_provider(&openai, &event("provider.create", "provider", openai.id)).await.unwrap();

    let mut route = route_record(project.id, "llama", vec![to_endpoint(endpoint.id, 3)]);
    route.fallbacks = vec![to_provider(openai.id, "gpt-4o-mini", 1)];
    route.rpm_limit = Some(600);
    let audit = event("route.create", "route", route.id);
    let before = audit_count(db).await;
    db.create_route(&route, &audit).await.unwrap();
    assert_eq!(audit_count(db).await, before + 1, "audited");
    assert_eq!(db.route(route.id).await.unwrap(), Some(route.clone()));
    assert_eq!(db.route(RouteId::new()).await.unwrap(), None);

    let mut same_name = route_record(project.id, "llama", vec![to_endpoint(endpoint.id, 1)]);
    assert_conflict(
        db.create_route(&same_name, &audit).await,
        "a route with this name already exists in the project",
    );
    same_name.project_id = other.id;
    db.create_route(&same_name, &audit).await.unwrap();
    let orphan = route_record(ProjectId::new(), "x", vec![to_endpoint(endpoint.id, 1)]);
    assert_reference(db.create_route(&orphan, &audit).await, "the project does not exist");

    let mut more = vec![route.clone()];
    for i in 0..3 {
        let r = route_record(project.id, &format!("r{i}"), vec![to_provider(openai.id, "m", 1)]);
        db.create_route(&r, &audit).await.unwrap();
        more.push(r);
    }
    let pages =
        all_pages(async |c| db.list_routes(project.id, c.as_ref(), limit(2)).await.unwrap()).await;
    assert_eq!(pages.len(), 2);
    assert_eq!(pages.concat(), more, "the project's routes only, oldest first");

    // A patch changes what it names; a limit can be cleared.
    let patch = RoutePatch {
        targets: Some(vec![to_endpoint(endpoint.id, 1), to_provider(openai.id, "gpt-4o", 2)]),
        rpm_limit: Some(None),
        tpm_limit: Some(Some(10_000)),
        ..RoutePatch::default()
    };
    let later = ts(ms_of(route.updated_at) + 1000);
    let updated = db.update_route(route.id, &patch, later, &audit).await.unwrap().unwrap();
    assert_eq!(updated.targets, patch.targets.clone().unwrap());
    assert_eq!(updated.fallbacks, route.fallbacks, "untouched");
    assert_eq!((updated.rpm_limit, updated.tpm_limit), (None, Some(10_000)));
    assert_eq!((updated.name.clone(), updated.updated_at), (route.name.clone(), later));
    let untouched = db
        .update_route(
            route.id,
            &RoutePatch { name: Some(name("llama-3")), ..RoutePatch::default() },
            later,
            &audit,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(untouched.tpm_limit, Some(10_000), "absent limits stay");
    assert_conflict(
        db.update_route(
            route.id,
            &RoutePatch { name: Some(name("r0")), ..RoutePatch::default() },
            later,
            &audit,
        )
        .await,
        "a route with this name already exists in the project",
    );
    assert_eq!(db.update_route(RouteId::new(), &patch, later, &audit).await.unwrap(), None);

    let before = audit_count(db).await;
    assert!(db.delete_route(route.id, &audit).await.unwrap());
    assert!(!db.delete_route(route.id, &audit).await.unwrap());
    assert_eq!(audit_count(db).await, before + 1);
    assert_eq!(db.route(route.id).await.unwrap(), None);

    // Routes go with their project.
    let audit = event("project.delete", "project", other.id);
    assert!(db.delete_project(other.id, &audit).await.unwrap());
    assert_eq!(db.route(same_name.id).await.unwrap(), None);
}

fn ms_of(at: Timestamp) -> i64 {
    at.timestamp_millis()
}

/// The configuration holds active keys, every route, RUNNING endpoints with their model's name
/// and addresses, and providers with their sealed keys.
async fn gateway_config_holds_what_the_gateway_routes_with(db: &TestDatabase) {
    let (project, model, cluster) = deployment_target(db).await;
    let mut running = endpoint_record(project.id, model.id, cluster.id, "running");
    running.status = EndpointStatus::Running;
    running.addresses = vec!["10.0.0.2:8000".to_owned(), "10.0.0.1:8000".to_owned()];
    new_endpoint(db, &running).await;
    let pending = endpoint_record(project.id, model.id, cluster.id, "pending");
    new_endpoint(db, &pending).await;
    let active = api_key_record(project.id, "hash-active");
    let mut expired = api_key_record(project.id, "hash-expired");
    expired.expires_at = Some(ts(1_000));
    let revoked = api_key_record(project.id, "hash-revoked");
    for key in [&active, &expired, &revoked] {
        db.create_api_key(key, &event("key.create", "api_key", key.id)).await.unwrap();
    }
    db.revoke_api_key(revoked.id, now(), &event("key.revoke", "api_key", revoked.id))
        .await
        .unwrap();
    let openai = provider_record("openai");
    db.create_provider(&openai, &event("provider.create", "provider", openai.id)).await.unwrap();
    let route = route_record(project.id, "chat", vec![to_provider(openai.id, "gpt-4o", 1)]);
    db.create_route(&route, &event("route.create", "route", route.id)).await.unwrap();

    let config = db.gateway_config().await.unwrap();
    assert_eq!(config.version, db.config_version().await.unwrap());
    let hashes: Vec<&str> = config.keys.iter().map(|k| k.hash.as_str()).collect();
    assert_eq!(hashes, ["hash-active", "hash-expired"], "revoked keys are absent");
    assert_eq!(
        config.keys[0],
        GatewayKey {
            id: active.id,
            project_id: project.id,
            hash: "hash-active".to_owned(),
            expires_at: active.expires_at,
            rpm_limit: Some(60),
            tpm_limit: None,
        }
    );
    assert_eq!(
        config.endpoints,
        vec![GatewayEndpoint {
            id: running.id,
            project_id: project.id,
            model_name: "llama".to_owned(),
            addresses: vec!["10.0.0.1:8000".to_owned(), "10.0.0.2:8000".to_owned()],
        }],
        "RUNNING endpoints only"
    );
    assert_eq!(
        config.providers,
        vec![GatewayProvider {
            id: openai.id,
            base_url: openai.base_url.clone(),
            api_key_ciphertext: "sealed-openai".to_owned(),
        }]
    );
    assert_eq!(
        config.routes,
        vec![GatewayRoute {
            id: route.id,
            project_id: project.id,
            name: "chat".to_owned(),
            targets: route.targets.clone(),
            fallbacks: vec![],
            rpm_limit: None,
            tpm_limit: None,
        }]
    );
}

/// Every change the snapshot depends on moves the version; changes it does not depend on, and
/// reads, leave it.
async fn config_version_moves_with_every_gateway_change(db: &TestDatabase) {
    let (project, model, cluster) = deployment_target(db).await;
    let mut version = db.config_version().await.unwrap();
    let mut moved = async |what: &str, expected: bool| {
        let now_version = db.config_version().await.unwrap();
        assert_eq!(now_version != version, expected, "{what}: {version} -> {now_version}");
        version = now_version;
    };

    let endpoint = endpoint_record(project.id, model.id, cluster.id, "chat");
    new_endpoint(db, &endpoint).await;
    moved("endpoint created", true).await;
    db.gateway_config().await.unwrap();
    moved("a read", false).await;
    let change = change(EndpointStatus::Pending, EndpointStatus::Deploying, 1, "deploying");
    assert!(db.transition_endpoint(endpoint.id, &change, None, None).await.unwrap());
    moved("status change", true).await;
    assert!(db.set_ready_replicas(endpoint.id, 1, &[]).await.unwrap());
    moved("a ready count alone", false).await;
    assert!(db.set_ready_replicas(endpoint.id, 1, &["10.0.0.1:80".to_owned()]).await.unwrap());
    moved("addresses", true).await;
    let patch = EndpointPatch { replicas: Some(3), min_replicas: None };
    db.update_endpoint(
        endpoint.id,
        &patch,
        now(),
        &event("endpoint.scale", "endpoint", endpoint.id),
    )
    .await
    .unwrap();
    moved("a spec change", false).await;

    let audit = event("model.update", "model", model.id);
    let describe = ModelPatch { description: Some("d".into()), ..ModelPatch::default() };
    db.update_model(model.id, &describe, now(), &audit).await.unwrap();
    moved("a model description", false).await;
    let rename = ModelPatch { name: Some(name("llama-3")), ..ModelPatch::default() };
    db.update_model(model.id, &rename, now(), &audit).await.unwrap();
    moved("a model rename", true).await;

    let key = api_key_record(project.id, "hash");
    db.create_api_key(&key, &event("key.create", "api_key", key.id)).await.unwrap();
    moved("key created", true).await;
    db.revoke_api_key(key.id, now(), &event("key.revoke", "api_key", key.id)).await.unwrap();
    moved("key revoked", true).await;
    db.revoke_api_key(key.id, now(), &event("key.revoke", "api_key", key.id)).await.unwrap();
    moved("key revoked again", false).await;

    let provider = provider_record("openai");
    let audit = event("provider.create", "provider", provider.id);
    db.create_provider(&provider, &audit).await.unwrap();
    moved("provider created", true).await;
    let rotate =
        ProviderPatch { api_key_ciphertext: Some("new".into()), ..ProviderPatch::default() };
    db.update_provider(provider.id, &rotate, now(), &audit).await.unwrap();
    moved("provider key changed", true).await;

    let route = route_record(project.id, "chat", vec![to_provider(provider.id, "m", 1)]);
    let audit = event("route.create", "route", route.id);
    db.create_route(&route, &audit).await.unwrap();
    moved("route created", true).await;
    let patch = RoutePatch { rpm_limit: Some(Some(5)), ..RoutePatch::default() };
    db.update_route(route.id, &patch, now(), &audit).await.unwrap();
    moved("route changed", true).await;
    db.delete_route(route.id, &audit).await.unwrap();
    moved("route deleted", true).await;
    db.delete_provider(provider.id, &audit).await.unwrap();
    moved("provider deleted", true).await;

    // A project's keys and routes go with it.
    let other = new_project(db, "beta", None).await;
    moved("a project alone", false).await;
    let key = api_key_record(other.id, "hash-beta");
    db.create_api_key(&key, &event("key.create", "api_key", key.id)).await.unwrap();
    moved("key created", true).await;
    db.delete_project(other.id, &event("project.delete", "project", other.id)).await.unwrap();
    moved("project with a key deleted", true).await;
}

async fn usage_is_inserted_once_and_summarised(db: &TestDatabase) {
    let project = ProjectId::new();
    let other = ProjectId::new();
    let (k1, k2) = (ApiKeyId::new(), ApiKeyId::new());
    let row = |at: i64, project: ProjectId, key: ApiKeyId, model: &str, status: i64| UsageRow {
        id: uuid::Uuid::new_v4(),
        at: ts(at),
        key_id: key,
        project_id: project,
        model: model.to_owned(),
        route: "endpoint:e".to_owned(),
        target: "replica:e/10.0.0.1:80".to_owned(),
        prompt_tokens: 10,
        completion_tokens: 5,
        latency_ms: 100 + at % 100,
        status,
    };
    let rows = vec![
        row(1_000, project, k1, "llama", 200),
        row(1_010, project, k1, "llama", 500),
        row(1_020, project, k2, "gpt", 200),
        row(1_030, other, k2, "llama", 429),
        row(5_000, project, k1, "llama", 200),
    ];
    assert_eq!(db.insert_usage(&[]).await.unwrap(), 0);
    let writes = db.writes();
    assert_eq!(db.insert_usage(&rows).await.unwrap(), 5);
    assert_eq!(db.writes(), writes + 1, "one statement per batch");
    assert_eq!(db.insert_usage(&rows[..3]).await.unwrap(), 0, "a batch written twice counts once");
    let mut mixed = rows[..1].to_vec();
    mixed.push(row(1_040, project, k1, "llama", 200));
    assert_eq!(db.insert_usage(&mixed).await.unwrap(), 1);

    // Above one statement's rows, still one transaction.
    let many: Vec<UsageRow> = (0..1_200).map(|i| row(10_000 + i, other, k1, "bulk", 200)).collect();
    assert_eq!(db.insert_usage(&many).await.unwrap(), 1_200);

    let filter = UsageFilter {
        since: ts(1_000),
        until: ts(2_000),
        project: None,
        key: None,
        model: None,
        group_by: UsageGroup::Model,
    };
    let by_model = db.usage_summary(&filter).await.unwrap();
    assert_eq!(
        by_model,
        vec![
            UsageSummaryRow {
                group: "gpt".into(),
                requests: 1,
                errors: 0,
                prompt_tokens: 10,
                completion_tokens: 5,
                avg_latency_ms: 120.0,
            },
            UsageSummaryRow {
                group: "llama".into(),
                requests: 4,
                errors: 2,
                prompt_tokens: 40,
                completion_tokens: 20,
                avg_latency_ms: (100.0 + 110.0 + 130.0 + 140.0) / 4.0,
            },
        ],
        "since inclusive, until exclusive"
    );
    let in_project =
        UsageFilter { project: Some(project), group_by: UsageGroup::Key, ..filter.clone() };
    let by_key = db.usage_summary(&in_project).await.unwrap();
    let mut expected = vec![(k1.to_string(), 3, 1), (k2.to_string(), 1, 0)];
    expected.sort();
    let got: Vec<(String, i64, i64)> =
        by_key.iter().map(|r| (r.group.clone(), r.requests, r.errors)).collect();
    assert_eq!(got, expected);
    let one = UsageFilter {
        key: Some(k2),
        model: Some("llama".into()),
        group_by: UsageGroup::Project,
        ..filter.clone()
    };
    let by_project = db.usage_summary(&one).await.unwrap();
    assert_eq!(by_project.len(), 1);
    assert_eq!((by_project[0].group.clone(), by_project[0].requests), (other.to_string(), 1));
    let nothing = UsageFilter { since: ts(3_000), until: ts(4_000), ..filter };
    assert!(db.usage_summary(&nothing).await.unwrap().is_empty());
}
