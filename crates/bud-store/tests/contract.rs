//! The store's contract, run against both backends: every test body is written once as an async
//! fn over a fresh database, and `contract_tests!` runs it as `sqlite::<name>` and
//! `postgres::<name>`. PostgreSQL tests run when `BUD_TEST_POSTGRES_URL` names an admin URL,
//! each on a database of its own; otherwise they print that they were skipped.

// The bodies are plain async fns, not #[test]s, so clippy's test allowances do not reach them.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::time::Duration;

use bud_domain::{
    ApiKeyId, Cursor, Email, Engine, Grant, GrantId, Modality, ModelId, Name, Page, PageLimit,
    Permission, ProjectId, ProviderId, Role, SourceUri, Timestamp, UserId,
};
use bud_store::testing::{TestDatabase, fresh_postgres, fresh_sqlite, postgres_admin_url};
use bud_store::{
    ApiKey, AuditEvent, AuditFilter, AuditRecord, Backend, GENESIS_HASH, GrantRecord, Model,
    ModelPatch, Project, ProjectPatch, Provider, ProviderPatch, RefreshToken, SigningKey, Store,
    StoreConfig, StoreError, User, UserPatch, audit_hash,
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
