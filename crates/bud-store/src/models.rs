//! Registered models: what can be deployed, and from where.

use bud_domain::{
    Cursor, Engine, Modality, ModelId, Name, Page, PageLimit, SourceUri, Timestamp, UserId,
};

use crate::audit::AuditEvent;
use crate::error::Violations;
use crate::row::{after_key, ms, opt_parse, overfetch, stored, timestamp};
use crate::{Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub id: ModelId,
    /// Unique across models: the gateway routes requests by it.
    pub name: Name,
    pub source_uri: SourceUri,
    pub engine: Engine,
    pub modality: Modality,
    pub description: String,
    pub created_by: Option<UserId>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// Changes to a model; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ModelPatch {
    pub name: Option<Name>,
    pub source_uri: Option<SourceUri>,
    pub engine: Option<Engine>,
    pub modality: Option<Modality>,
    pub description: Option<String>,
}

const MODEL_WORDS: Violations<'static> = Violations {
    conflict: "a model with this name already exists",
    reference: "the creator does not exist",
};

impl Store {
    pub async fn create_model(&self, model: &Model, audit: &AuditEvent) -> Result<(), StoreError> {
        let insert = sqlx::query(
            "INSERT INTO models (id, name, source_uri, engine, modality, description, created_by, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(model.id.to_string())
        .bind(model.name.as_str())
        .bind(model.source_uri.as_str())
        .bind(model.engine.as_str())
        .bind(model.modality.as_str())
        .bind(&model.description)
        .bind(model.created_by.map(|id| id.to_string()))
        .bind(ms(model.created_at))
        .bind(ms(model.updated_at));
        self.insert_audited(insert, MODEL_WORDS, audit).await
    }

    pub async fn model(&self, id: ModelId) -> Result<Option<Model>, StoreError> {
        let row: Option<ModelRow> =
            sqlx::query_as(&format!("SELECT {MODEL_COLUMNS} FROM models WHERE id = $1"))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        row.map(Model::try_from).transpose()
    }

    pub async fn list_models(
        &self,
        after: Option<&Cursor>,
        limit: PageLimit,
    ) -> Result<Page<Model>, StoreError> {
        let rows: Vec<ModelRow> = sqlx::query_as(&format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after_key(after))
        .bind(overfetch(limit))
        .fetch_all(&self.pool)
        .await?;
        let models = rows.into_iter().map(Model::try_from).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(models, limit, |m| m.id.to_string()))
    }

    /// Applies `patch`; `None` (and no audit record) if there is no such model.
    pub async fn update_model(
        &self,
        id: ModelId,
        patch: &ModelPatch,
        now: Timestamp,
        audit: &AuditEvent,
    ) -> Result<Option<Model>, StoreError> {
        let sql = format!(
            "UPDATE models SET name = COALESCE($2, name), source_uri = COALESCE($3, source_uri), \
             engine = COALESCE($4, engine), modality = COALESCE($5, modality), \
             description = COALESCE($6, description), updated_at = $7 \
             WHERE id = $1 RETURNING {MODEL_COLUMNS}"
        );
        let update = sqlx::query_as::<_, ModelRow>(&sql)
            .bind(id.to_string())
            .bind(patch.name.as_ref().map(|n| n.as_str().to_owned()))
            .bind(patch.source_uri.as_ref().map(|s| s.as_str().to_owned()))
            .bind(patch.engine.map(|e| e.as_str().to_owned()))
            .bind(patch.modality.map(|m| m.as_str().to_owned()))
            .bind(patch.description.clone())
            .bind(ms(now));
        self.update_audited(update, MODEL_WORDS, audit).await
    }

    /// False (and no audit record) if there was no such model; Reference while endpoints
    /// still serve it.
    pub async fn delete_model(&self, id: ModelId, audit: &AuditEvent) -> Result<bool, StoreError> {
        let delete = sqlx::query("DELETE FROM models WHERE id = $1").bind(id.to_string());
        let words =
            Violations { reference: "endpoints still serve this model", ..Violations::GENERIC };
        self.delete_audited(delete, words, audit).await
    }
}

const MODEL_COLUMNS: &str =
    "id, name, source_uri, engine, modality, description, created_by, created_at, updated_at";

#[derive(sqlx::FromRow)]
struct ModelRow {
    id: String,
    name: String,
    source_uri: String,
    engine: String,
    modality: String,
    description: String,
    created_by: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<ModelRow> for Model {
    type Error = StoreError;

    fn try_from(row: ModelRow) -> Result<Self, StoreError> {
        Ok(Model {
            id: stored("models.id", row.id.parse())?,
            name: stored("models.name", Name::parse("name", &row.name))?,
            source_uri: stored(
                "models.source_uri",
                SourceUri::parse("source_uri", &row.source_uri),
            )?,
            engine: stored("models.engine", row.engine.parse())?,
            modality: stored("models.modality", row.modality.parse())?,
            description: row.description,
            created_by: stored("models.created_by", opt_parse(row.created_by.as_deref()))?,
            created_at: stored("models.created_at", timestamp(row.created_at))?,
            updated_at: stored("models.updated_at", timestamp(row.updated_at))?,
        })
    }
}
