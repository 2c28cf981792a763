//! The audit log: an append-only, hash-chained record of every change.
//!
//! Each record's hash covers its fields and the previous record's hash, and the single-row
//! `audit_head` table holds the last sequence number and hash. Changing a field, deleting a
//! record or cutting off the tail all break the chain, which [`Store::verify_audit`] finds.
//! Appenders lock the head row first, so appends are serialised and the chain has no forks.

use bud_domain::{Cursor, Page, PageLimit, ProjectId, Timestamp, UserId};
use sha2::{Digest, Sha256};
use sqlx::AnyConnection;

use crate::row::{ms, opt_parse, overfetch, stored, timestamp};
use crate::{Store, StoreError};

/// The `prev_hash` of the first record, and the head's hash while the log is empty.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One thing that happened, as the service describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// Stored with millisecond precision.
    pub at: Timestamp,
    pub actor_id: Option<UserId>,
    /// The actor's email, or "system"; kept as text so the record reads on its own after the
    /// user changes.
    pub actor: String,
    /// What happened, e.g. "project.create".
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    /// The project the resource lives in, so a project's history can be listed.
    pub project_id: Option<ProjectId>,
    pub details: serde_json::Value,
    pub request_id: Option<String>,
}

/// An event as chained into the log.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Position in the chain; the first record is 1 and there are no gaps.
    pub seq: i64,
    pub event: AuditEvent,
    pub prev_hash: String,
    /// [`audit_hash`] of this record.
    pub hash: String,
}

/// Which records [`Store::list_audit`] returns; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor_id: Option<UserId>,
    pub action: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub project_id: Option<ProjectId>,
    /// Inclusive.
    pub since: Option<Timestamp>,
    /// Exclusive.
    pub until: Option<Timestamp>,
}

/// The outcome of walking the whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerification {
    pub records_checked: i64,
    /// The first record that is changed, missing or wrongly linked; `None` when the chain holds.
    pub first_broken_seq: Option<i64>,
    /// Why the chain is broken there, in words.
    pub reason: Option<String>,
}

/// The hash of one audit record: lowercase hex SHA-256 over its canonical bytes.
///
/// The canonical bytes are the fields seq, at (unix ms), actor_id or "", actor, action,
/// resource_type, resource_id, project_id or "", details (compact JSON), request_id or "" and
/// prev_hash, in that order, each written as its byte length (u64 big-endian) followed by its
/// bytes; integers are written in decimal. Length prefixes make the encoding unambiguous: no two
/// different records share it.
pub fn audit_hash(seq: i64, event: &AuditEvent, prev_hash: &str) -> String {
    let actor_id = event.actor_id.map(|id| id.to_string());
    let project_id = event.project_id.map(|id| id.to_string());
    chain_hash(&ChainFields {
        seq,
        at: ms(event.at),
        actor_id: actor_id.as_deref(),
        actor: &event.actor,
        action: &event.action,
        resource_type: &event.resource_type,
        resource_id: &event.resource_id,
        project_id: project_id.as_deref(),
        details: &event.details.to_string(),
        request_id: event.request_id.as_deref(),
        prev_hash,
    })
}

impl Store {
    /// Appends one event in its own transaction, for things that change no other table (logins,
    /// failed logins, token refreshes).
    pub async fn append_audit(&self, event: &AuditEvent) -> Result<AuditRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let record = self.append_in(&mut tx, event).await?;
        tx.commit().await?;
        Ok(record)
    }

    /// Records matching `filter`, oldest first; the cursor is the last record's seq. A cursor
    /// that is not a seq yields an empty page.
    pub async fn list_audit(
        &self,
        filter: &AuditFilter,
        after: Option<&Cursor>,
        limit: PageLimit,
    ) -> Result<Page<AuditRecord>, StoreError> {
        let after_seq = match after.map(|c| c.as_str().parse::<i64>()) {
            None => 0,
            Some(Ok(seq)) => seq,
            Some(Err(_)) => return Ok(Page { items: Vec::new(), next_cursor: None }),
        };
        let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1");
        let mut binds = vec![Bind::Int(after_seq)];
        let mut condition = |clause: &str, value: Bind| {
            binds.push(value);
            sql.push_str(&format!(" AND {clause} ${}", binds.len()));
        };
        if let Some(id) = filter.actor_id {
            condition("actor_id =", Bind::Text(id.to_string()));
        }
        if let Some(action) = &filter.action {
            condition("action =", Bind::Text(action.clone()));
        }
        if let Some(resource_type) = &filter.resource_type {
            condition("resource_type =", Bind::Text(resource_type.clone()));
        }
        if let Some(resource_id) = &filter.resource_id {
            condition("resource_id =", Bind::Text(resource_id.clone()));
        }
        if let Some(id) = filter.project_id {
            condition("project_id =", Bind::Text(id.to_string()));
        }
        if let Some(since) = filter.since {
            condition("at >=", Bind::Int(ms(since)));
        }
        if let Some(until) = filter.until {
            condition("at <", Bind::Int(ms(until)));
        }
        binds.push(Bind::Int(overfetch(limit)));
        sql.push_str(&format!(" ORDER BY seq LIMIT ${}", binds.len()));

        let mut query = sqlx::query_as::<_, AuditRow>(&sql);
        for bind in binds {
            query = match bind {
                Bind::Text(s) => query.bind(s),
                Bind::Int(i) => query.bind(i),
            };
        }
        let rows = query.fetch_all(&self.pool).await?;
        let records = rows.into_iter().map(AuditRecord::try_from).collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_overfetch(records, limit, |r| r.seq.to_string()))
    }

    /// Walks the whole chain in batches, recomputing every hash and checking every link and the
    /// head. Reports the first break rather than failing, so a damaged row is found, not fatal.
    pub async fn verify_audit(&self) -> Result<AuditVerification, StoreError> {
        const BATCH: i64 = 1000;
        // The head is read first: records up to its seq were committed with it, and records
        // appended while the walk runs lie beyond it and are left for the next check.
        let (head_seq, head_hash): (i64, String) =
            sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
                .fetch_one(&self.pool)
                .await?;
        let mut checked = 0;
        let mut last_seq = 0;
        let mut last_hash = GENESIS_HASH.to_owned();
        let broken = |seq: i64, checked: i64, reason: String| AuditVerification {
            records_checked: checked,
            first_broken_seq: Some(seq),
            reason: Some(reason),
        };
        loop {
            let rows: Vec<AuditRow> = sqlx::query_as(&format!(
                "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 AND seq <= $2 \
                 ORDER BY seq LIMIT $3"
            ))
            .bind(last_seq)
            .bind(head_seq)
            .bind(BATCH)
            .fetch_all(&self.pool)
            .await?;
            let batch_len = rows.len();
            for row in rows {
                checked += 1;
                if row.seq != last_seq + 1 {
                    let reason = format!("record {} is missing", last_seq + 1);
                    return Ok(broken(last_seq + 1, checked, reason));
                }
                if row.prev_hash != last_hash {
                    let reason = format!("record {} does not link to record {last_seq}", row.seq);
                    return Ok(broken(row.seq, checked, reason));
                }
                if row.computed_hash() != row.hash {
                    let reason = format!("record {} was changed after it was written", row.seq);
                    return Ok(broken(row.seq, checked, reason));
                }
                last_seq = row.seq;
                last_hash = row.hash;
            }
            if batch_len < BATCH as usize {
                break;
            }
        }
        if last_seq != head_seq {
            let reason = format!(
                "the log ends at record {last_seq} but the head says {head_seq}: records were \
                 removed from the end"
            );
            return Ok(broken(last_seq + 1, checked, reason));
        }
        if last_hash != head_hash {
            let reason = format!("record {last_seq} does not match the head's hash");
            return Ok(broken(last_seq, checked, reason));
        }
        Ok(AuditVerification { records_checked: checked, first_broken_seq: None, reason: None })
    }
}

impl Store {
    /// Appends `event` inside the caller's transaction; every audited change goes through here.
    pub(crate) async fn append_in(
        &self,
        conn: &mut AnyConnection,
        event: &AuditEvent,
    ) -> Result<AuditRecord, StoreError> {
        // The three statements of `chain`, counted up front like every other write.
        for _ in 0..3 {
            self.note_write();
        }
        chain(conn, event).await
    }
}

/// Chains `event` onto the log in three statements. Taking the head row's lock first serialises
/// appenders on PostgreSQL; SQLite serialises writers anyway.
async fn chain(conn: &mut AnyConnection, event: &AuditEvent) -> Result<AuditRecord, StoreError> {
    let (seq, prev_hash): (i64, String) =
        sqlx::query_as("UPDATE audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash")
            .fetch_one(&mut *conn)
            .await?;
    let mut event = event.clone();
    // Stored and hashed in milliseconds; the returned record says what was stored.
    event.at = stored("audit event at", timestamp(ms(event.at)))?;
    let hash = audit_hash(seq, &event, &prev_hash);
    sqlx::query(
        "INSERT INTO audit_log (seq, at, actor_id, actor, action, resource_type, resource_id, \
         project_id, details, request_id, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(seq)
    .bind(ms(event.at))
    .bind(event.actor_id.map(|id| id.to_string()))
    .bind(&event.actor)
    .bind(&event.action)
    .bind(&event.resource_type)
    .bind(&event.resource_id)
    .bind(event.project_id.map(|id| id.to_string()))
    .bind(event.details.to_string())
    .bind(event.request_id.clone())
    .bind(&prev_hash)
    .bind(&hash)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1")
        .bind(&hash)
        .execute(&mut *conn)
        .await?;
    Ok(AuditRecord { seq, event, prev_hash, hash })
}

const AUDIT_COLUMNS: &str = "seq, at, actor_id, actor, action, resource_type, resource_id, \
                             project_id, details, request_id, prev_hash, hash";

/// A value bound into a dynamically built filter.
enum Bind {
    Text(String),
    Int(i64),
}

/// The fields a record's hash covers, as stored.
struct ChainFields<'a> {
    seq: i64,
    at: i64,
    actor_id: Option<&'a str>,
    actor: &'a str,
    action: &'a str,
    resource_type: &'a str,
    resource_id: &'a str,
    project_id: Option<&'a str>,
    details: &'a str,
    request_id: Option<&'a str>,
    prev_hash: &'a str,
}

fn chain_hash(f: &ChainFields<'_>) -> String {
    let (seq, at) = (f.seq.to_string(), f.at.to_string());
    let fields = [
        seq.as_str(),
        at.as_str(),
        f.actor_id.unwrap_or(""),
        f.actor,
        f.action,
        f.resource_type,
        f.resource_id,
        f.project_id.unwrap_or(""),
        f.details,
        f.request_id.unwrap_or(""),
        f.prev_hash,
    ];
    let mut hasher = Sha256::new();
    for field in fields {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field.as_bytes());
    }
    hex::encode(hasher.finalize())
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    seq: i64,
    at: i64,
    actor_id: Option<String>,
    actor: String,
    action: String,
    resource_type: String,
    resource_id: String,
    project_id: Option<String>,
    details: String,
    request_id: Option<String>,
    prev_hash: String,
    hash: String,
}

impl AuditRow {
    /// The hash over the stored text itself, so verification needs no parsing and finds even
    /// changes that parsing would smooth over.
    fn computed_hash(&self) -> String {
        chain_hash(&ChainFields {
            seq: self.seq,
            at: self.at,
            actor_id: self.actor_id.as_deref(),
            actor: &self.actor,
            action: &self.action,
            resource_type: &self.resource_type,
            resource_id: &self.resource_id,
            project_id: self.project_id.as_deref(),
            details: &self.details,
            request_id: self.request_id.as_deref(),
            prev_hash: &self.prev_hash,
        })
    }
}

impl TryFrom<AuditRow> for AuditRecord {
    type Error = StoreError;

    fn try_from(row: AuditRow) -> Result<Self, StoreError> {
        Ok(AuditRecord {
            seq: row.seq,
            event: AuditEvent {
                at: stored("audit_log.at", timestamp(row.at))?,
                actor_id: stored("audit_log.actor_id", opt_parse(row.actor_id.as_deref()))?,
                actor: row.actor,
                action: row.action,
                resource_type: row.resource_type,
                resource_id: row.resource_id,
                project_id: stored("audit_log.project_id", opt_parse(row.project_id.as_deref()))?,
                details: stored("audit_log.details", serde_json::from_str(&row.details))?,
                request_id: row.request_id,
            },
            prev_hash: row.prev_hash,
            hash: row.hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> AuditEvent {
        AuditEvent {
            at: timestamp(1_700_000_000_123).unwrap(),
            actor_id: None,
            actor: "system".to_owned(),
            action: "project.create".to_owned(),
            resource_type: "project".to_owned(),
            resource_id: "p1".to_owned(),
            project_id: None,
            details: serde_json::json!({"name": "alpha"}),
            request_id: None,
        }
    }

    #[test]
    fn hash_is_stable_lowercase_hex() {
        let h = audit_hash(1, &event(), GENESIS_HASH);
        assert_eq!(h.len(), 64);
        assert!(h.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(h, audit_hash(1, &event(), GENESIS_HASH));
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = audit_hash(1, &event(), GENESIS_HASH);
        let mut variants = Vec::new();
        let mut e = event();
        e.at = timestamp(1_700_000_000_124).unwrap();
        variants.push(audit_hash(1, &e, GENESIS_HASH));
        let mut e = event();
        e.actor_id = Some(UserId::new());
        variants.push(audit_hash(1, &e, GENESIS_HASH));
        let mut e = event();
        e.actor = "ada@example.com".to_owned();
        variants.push(audit_hash(1, &e, GENESIS_HASH));
        let mut e = event();
        e.action = "project.delete".to_owned();
        variants.push(audit_hash(1, &e, GENESIS_HASH));
        let mut e = event();
        e.resource_type = "model".to_owned();
        variants.push(audit_hash(1, &e, GENESIS_HASH));
        let mut e = event();
        e.resource_id = "p2".to_owned();
        variants.push(audit_hash(1, &e, GENESIS_HASH));
        let mut e = event();
        e.project_id = Some(ProjectId::new());
        variants.push(audit_hash(1, &e, GENESIS_HASH));
        let mut e = event();
        e.details = serde_json::json!({"name": "beta"});
        variants.push(audit_hash(1, &e, GENESIS_HASH));
        let mut e = event();
        e.request_id = Some("req-1".to_owned());
        variants.push(audit_hash(1, &e, GENESIS_HASH));
        variants.push(audit_hash(2, &event(), GENESIS_HASH));
        variants.push(audit_hash(1, &event(), &"1".repeat(64)));
        for v in &variants {
            assert_ne!(v, &base);
        }
    }

    #[test]
    fn length_prefixes_keep_field_boundaries() {
        // Moving a character across a field boundary keeps the concatenation but not the hash.
        let mut a = event();
        a.resource_type = "projectx".to_owned();
        a.resource_id = "y".to_owned();
        let mut b = event();
        b.resource_type = "project".to_owned();
        b.resource_id = "xy".to_owned();
        assert_ne!(audit_hash(1, &a, GENESIS_HASH), audit_hash(1, &b, GENESIS_HASH));
    }
}
