//! Usage the gateway metered: one row per answered request, written in batches and summarised
//! per project, key or model. Not audited: it is data about traffic, not a change of platform
//! state.

use bud_domain::{ApiKeyId, ProjectId, Timestamp};

use crate::row::ms;
use crate::{Store, StoreError};

/// One answered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// Unique per request: a row whose id is already stored is skipped, so a batch written twice
    /// (a retry after a lost answer) counts once.
    pub id: uuid::Uuid,
    pub at: Timestamp,
    pub key_id: ApiKeyId,
    pub project_id: ProjectId,
    /// The public model name the client asked for.
    pub model: String,
    /// The route's label and the target's label that answered.
    pub route: String,
    pub target: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub latency_ms: i64,
    /// The HTTP status the client got; 400 and above count as errors.
    pub status: i64,
}

/// Which usage to summarise and how to group it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageFilter {
    /// Inclusive.
    pub since: Timestamp,
    /// Exclusive.
    pub until: Timestamp,
    pub project: Option<ProjectId>,
    pub key: Option<ApiKeyId>,
    pub model: Option<String>,
    pub group_by: UsageGroup,
}

/// What one summary row stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    Project,
    Key,
    Model,
}

/// Usage of one group over the filter's range.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageSummaryRow {
    /// The project id, key id or model name.
    pub group: String,
    pub requests: i64,
    /// Requests answered with a status of 400 or more (499: the client went away).
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub avg_latency_ms: f64,
}

/// Rows per INSERT statement: 11 parameters each stays far below both backends' limits on
/// parameters per statement (32766 on SQLite, 65535 on PostgreSQL).
const ROWS_PER_STATEMENT: usize = 500;

impl Store {
    /// Inserts a batch in one transaction, skipping rows whose id is already stored; returns
    /// how many were new.
    pub async fn insert_usage(&self, rows: &[UsageRow]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;
        let mut inserted = 0;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut sql = String::from(
                "INSERT INTO usage (id, at, key_id, project_id, model, route, target, \
                 prompt_tokens, completion_tokens, latency_ms, status) VALUES ",
            );
            for i in 0..chunk.len() {
                let n = i * 11;
                if i > 0 {
                    sql.push_str(", ");
                }
                let placeholders: Vec<String> = (1..=11).map(|k| format!("${}", n + k)).collect();
                sql.push('(');
                sql.push_str(&placeholders.join(", "));
                sql.push(')');
            }
            sql.push_str(" ON CONFLICT (id) DO NOTHING");
            let mut insert = sqlx::query(&sql);
            for row in chunk {
                insert = insert
                    .bind(row.id.to_string())
                    .bind(ms(row.at))
                    .bind(row.key_id.to_string())
                    .bind(row.project_id.to_string())
                    .bind(row.model.clone())
                    .bind(row.route.clone())
                    .bind(row.target.clone())
                    .bind(row.prompt_tokens)
                    .bind(row.completion_tokens)
                    .bind(row.latency_ms)
                    .bind(row.status);
            }
            self.note_write();
            inserted += insert.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Requests, errors, tokens and mean latency per group within the filter, ordered by group.
    pub async fn usage_summary(
        &self,
        filter: &UsageFilter,
    ) -> Result<Vec<UsageSummaryRow>, StoreError> {
        let group = match filter.group_by {
            UsageGroup::Project => "project_id",
            UsageGroup::Key => "key_id",
            UsageGroup::Model => "model",
        };
        // SUM of BIGINT is NUMERIC on PostgreSQL, which the Any driver cannot decode: cast back.
        let mut sql = format!(
            "SELECT {group} AS grp, COUNT(*) AS requests, \
             CAST(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS BIGINT) AS errors, \
             CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens, \
             CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens, \
             CAST(SUM(latency_ms) AS BIGINT) AS latency_ms \
             FROM usage WHERE at >= $1 AND at < $2"
        );
        let mut binds = Vec::new();
        for (column, value) in [
            ("project_id", filter.project.map(|p| p.to_string())),
            ("key_id", filter.key.map(|k| k.to_string())),
            ("model", filter.model.clone()),
        ] {
            if let Some(value) = value {
                binds.push(value);
                sql.push_str(&format!(" AND {column} = ${}", binds.len() + 2));
            }
        }
        sql.push_str(&format!(" GROUP BY {group} ORDER BY {group}"));
        let mut query =
            sqlx::query_as::<_, SummaryRow>(&sql).bind(ms(filter.since)).bind(ms(filter.until));
        for bind in binds {
            query = query.bind(bind);
        }
        let rows = query.fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(UsageSummaryRow::from).collect())
    }
}

#[derive(sqlx::FromRow)]
struct SummaryRow {
    grp: String,
    requests: i64,
    errors: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    latency_ms: i64,
}

impl From<SummaryRow> for UsageSummaryRow {
    // A mean latency does not need the precision of sums beyond 2^53 ms.
    fn from(row: SummaryRow) -> Self {
        let avg_latency_ms =
            if row.requests > 0 { row.latency_ms as f64 / row.requests as f64 } else { 0.0 };
        UsageSummaryRow {
            group: row.grp,
            requests: row.requests,
            errors: row.errors,
            prompt_tokens: row.prompt_tokens,
            completion_tokens: row.completion_tokens,
            avg_latency_ms,
        }
    }
}
