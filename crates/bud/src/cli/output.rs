//! How the client shows results: a table for people by default, the response as pretty JSON
//! with `--json` for scripts.

use bud_protocol::control::{
    ApiKeyDto, AuditRecordDto, ClusterDto, ClusterEventDto, EndpointDto, EndpointEventDto,
    GrantDto, MemberDto, ModelDto, PermissionsDto, ProjectDto, ProjectPermissionsDto, ProviderDto,
    UserDto,
};
use chrono::{DateTime, Utc};
use comfy_table::{Table, presets};
use serde::Serialize;

/// A resource that can be shown as a table row (in lists) or as field/value lines (`show`).
pub trait Tabular {
    /// Column headers of a list, in the order of [`Tabular::row`].
    const COLUMNS: &'static [&'static str];

    fn row(&self) -> Vec<String>;

    /// Field/value pairs for a single resource: its list columns unless it has more to say.
    fn details(&self) -> Vec<(&'static str, String)> {
        Self::COLUMNS.iter().copied().zip(self.row()).collect()
    }
}

/// What `--json` chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

impl Format {
    pub fn new(json: bool) -> Self {
        if json { Format::Json } else { Format::Table }
    }

    /// `value` as pretty JSON, or as `to_table` renders it.
    pub fn render<T: Serialize + ?Sized>(
        self,
        value: &T,
        to_table: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<String> {
        match self {
            Format::Json => Ok(serde_json::to_string_pretty(value)?),
            Format::Table => Ok(to_table(value)),
        }
    }

    /// One resource: field/value lines.
    pub fn one<T: Serialize + Tabular>(self, item: &T) -> anyhow::Result<String> {
        self.render(item, details)
    }

    /// Every item of a list, fetched across pages; in JSON, shaped like one page
    /// (`{"data": [...]}`) without a cursor.
    pub fn list<T: Serialize + Tabular>(self, items: &[T]) -> anyhow::Result<String> {
        match self {
            Format::Json => {
                Ok(serde_json::to_string_pretty(&serde_json::json!({ "data": items }))?)
            }
            Format::Table => Ok(table(items)),
        }
    }

    /// A confirmation for an action whose response has no body (deletes); nothing in JSON, so
    /// scripts see an empty output and the exit status.
    pub fn done(self, message: String) -> anyhow::Result<String> {
        Ok(match self {
            Format::Json => String::new(),
            Format::Table => message,
        })
    }
}

/// Prints a rendered result, if there is one.
pub fn print(rendered: &str) {
    if !rendered.is_empty() {
        println!("{rendered}");
    }
}

/// Items as a borderless table with a header row.
pub fn table<T: Tabular>(items: &[T]) -> String {
    borderless(T::COLUMNS.iter().map(|c| c.to_string()).collect(), items.iter().map(T::row))
}

/// One item as `FIELD  value` lines.
pub fn details<T: Tabular>(item: &T) -> String {
    fields(item.details())
}

/// `FIELD  value` lines, the values lined up.
pub fn fields(pairs: Vec<(&'static str, String)>) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table.add_rows(pairs.into_iter().map(|(field, value)| vec![field.to_owned(), value]));
    pad(&mut table);
    table.trim_fmt()
}

/// A resource's details, then its recent history as a table (left out when there is none).
pub fn details_with_events<T: Tabular, E: Tabular>(item: &T, events: &[E]) -> String {
    if events.is_empty() {
        return details(item);
    }
    format!("{}\n\nRecent events (newest first):\n{}", details(item), table(events))
}

/// A user's role, grants and effective permissions, as three blocks.
pub fn permissions(p: &PermissionsDto) -> String {
    let facts = [
        ("USER", p.user_id.to_string()),
        ("ROLE", p.role.clone()),
        ("FROM ROLE", list_or_dash(&p.role_permissions)),
        ("PLATFORM", list_or_dash(&p.platform)),
    ];
    let mut head = Table::new();
    head.load_preset(presets::NOTHING);
    head.add_rows(facts.into_iter().map(|(field, value)| vec![field.to_owned(), value]));
    pad(&mut head);
    format!(
        "{}\n\nGrants:\n{}\n\nIn projects:\n{}",
        head.trim_fmt(),
        table(&p.grants),
        table(&p.projects)
    )
}

/// A timestamp to the minute, in UTC: enough to tell resources apart in a table.
pub fn short_time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M").to_string()
}

/// A timestamp to the second, in UTC: for events and checks, where minutes are too coarse.
pub fn precise_time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// An endpoint's replicas as `ready/desired`, as in the waiting lines and `kubectl get`.
pub fn replicas(e: &EndpointDto) -> String {
    format!("{}/{}", e.replicas_ready, e.replicas_desired)
}

/// An argument as a shell would need it typed: as it is unless it holds spaces, quotes or
/// other characters the shell reads (`--dtype=half` stays bare, `a b` becomes `'a b'`).
fn shell_word(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_=.,:/@%+".contains(c));
    if plain {
        return arg.to_owned();
    }
    shlex::try_quote(arg).map_or_else(|_| format!("{arg:?}"), |q| q.into_owned())
}

fn borderless(header: Vec<String>, rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header(header).add_rows(rows);
    pad(&mut table);
    table.trim_fmt()
}

/// Columns start at the left margin and are two spaces apart, like `kubectl get`.
fn pad(table: &mut Table) {
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
}

fn optional<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() { "-".to_owned() } else { items.join(", ") }
}

/// Long free text cut to fit a table cell.
fn clip(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let mut clipped: String = text.chars().take(max_chars - 1).collect();
    clipped.push('…');
    clipped
}

impl Tabular for UserDto {
    const COLUMNS: &'static [&'static str] = &["ID", "EMAIL", "NAME", "ROLE", "STATUS", "CREATED"];

    fn row(&self) -> Vec<String> {
        let status = if self.disabled { "disabled" } else { "active" };
        vec![
            self.id.to_string(),
            self.email.clone(),
            self.name.clone(),
            self.role.clone(),
            status.to_owned(),
            short_time(&self.created_at),
        ]
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        let mut fields: Vec<_> = Self::COLUMNS.iter().copied().zip(self.row()).collect();
        let source = if self.external { "external identity provider" } else { "local account" };
        fields.push(("SOURCE", source.to_owned()));
        fields.push(("UPDATED", short_time(&self.updated_at)));
        fields
    }
}

impl Tabular for GrantDto {
    const COLUMNS: &'static [&'static str] = &["PERMISSION", "PROJECT", "GRANTED BY", "CREATED"];

    fn row(&self) -> Vec<String> {
        vec![
            self.permission.clone(),
            optional(self.project_id),
            optional(self.granted_by),
            short_time(&self.created_at),
        ]
    }
}

impl Tabular for ProjectPermissionsDto {
    const COLUMNS: &'static [&'static str] = &["PROJECT", "PERMISSIONS"];

    fn row(&self) -> Vec<String> {
        vec![self.project_id.to_string(), list_or_dash(&self.permissions)]
    }
}

impl Tabular for ProjectDto {
    const COLUMNS: &'static [&'static str] = &["ID", "NAME", "DESCRIPTION", "CREATED"];

    fn row(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.name.clone(),
            clip(&self.description, 40),
            short_time(&self.created_at),
        ]
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ID", self.id.to_string()),
            ("NAME", self.name.clone()),
            ("DESCRIPTION", self.description.clone()),
            ("CREATED BY", optional(self.created_by)),
            ("CREATED", short_time(&self.created_at)),
            ("UPDATED", short_time(&self.updated_at)),
        ]
    }
}

impl Tabular for MemberDto {
    const COLUMNS: &'static [&'static str] = &["USER ID", "EMAIL", "NAME", "ADDED"];

    fn row(&self) -> Vec<String> {
        vec![
            self.user_id.to_string(),
            self.email.clone(),
            self.name.clone(),
            short_time(&self.added_at),
        ]
    }
}

impl Tabular for ModelDto {
    const COLUMNS: &'static [&'static str] =
        &["ID", "NAME", "ENGINE", "MODALITY", "SOURCE", "CREATED"];

    fn row(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.name.clone(),
            self.engine.clone(),
            self.modality.clone(),
            self.source_uri.clone(),
            short_time(&self.created_at),
        ]
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        let mut fields: Vec<_> = Self::COLUMNS.iter().copied().zip(self.row()).collect();
        fields.push(("DESCRIPTION", self.description.clone()));
        fields.push(("UPDATED", short_time(&self.updated_at)));
        fields
    }
}

impl Tabular for ProviderDto {
    const COLUMNS: &'static [&'static str] = &["ID", "NAME", "BASE URL", "API KEY", "CREATED"];

    fn row(&self) -> Vec<String> {
        let key = if self.api_key_set { "set" } else { "-" };
        vec![
            self.id.to_string(),
            self.name.clone(),
            self.base_url.clone(),
            key.to_owned(),
            short_time(&self.created_at),
        ]
    }
}

impl Tabular for ApiKeyDto {
    const COLUMNS: &'static [&'static str] =
        &["ID", "NAME", "PREFIX", "STATUS", "EXPIRES", "RPM", "TPM", "CREATED"];

    fn row(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.name.clone(),
            self.prefix.clone(),
            self.status.clone(),
            optional(self.expires_at.as_ref().map(short_time)),
            optional(self.rpm_limit),
            optional(self.tpm_limit),
            short_time(&self.created_at),
        ]
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ID", self.id.to_string()),
            ("NAME", self.name.clone()),
            ("PROJECT", self.project_id.to_string()),
            ("PREFIX", self.prefix.clone()),
            ("STATUS", self.status.clone()),
            ("RPM LIMIT", optional(self.rpm_limit)),
            ("TPM LIMIT", optional(self.tpm_limit)),
            ("CREATED BY", optional(self.created_by)),
            ("CREATED", short_time(&self.created_at)),
            ("EXPIRES", optional(self.expires_at.as_ref().map(short_time))),
            ("REVOKED", optional(self.revoked_at.as_ref().map(short_time))),
        ]
    }
}

impl Tabular for AuditRecordDto {
    const COLUMNS: &'static [&'static str] =
        &["SEQ", "AT", "ACTOR", "ACTION", "RESOURCE", "PROJECT"];

    fn row(&self) -> Vec<String> {
        vec![
            self.seq.to_string(),
            precise_time(&self.at),
            self.actor.clone(),
            self.action.clone(),
            format!("{} {}", self.resource_type, self.resource_id),
            optional(self.project_id),
        ]
    }
}

impl Tabular for ClusterDto {
    const COLUMNS: &'static [&'static str] =
        &["ID", "NAME", "KIND", "STATUS", "NODES", "GPUS", "LAST CHECK"];

    fn row(&self) -> Vec<String> {
        let inventory = self.inventory.as_ref();
        vec![
            self.id.to_string(),
            self.name.clone(),
            self.kind.clone(),
            self.status.clone(),
            optional(inventory.map(|i| i.nodes)),
            optional(inventory.map(|i| format!("{}/{}", i.gpus_allocatable, i.gpus_total))),
            optional(self.last_checked_at.as_ref().map(precise_time)),
        ]
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        let inventory = self.inventory.as_ref();
        let namespace = if self.namespace.is_empty() { "-" } else { &self.namespace };
        let reason = if self.reason.is_empty() { "-" } else { &self.reason };
        vec![
            ("ID", self.id.to_string()),
            ("NAME", self.name.clone()),
            ("KIND", self.kind.clone()),
            ("STATUS", self.status.clone()),
            ("REASON", reason.to_owned()),
            ("NAMESPACE", namespace.to_owned()),
            ("LAST CHECK", optional(self.last_checked_at.as_ref().map(precise_time))),
            ("FAILED CHECKS", self.consecutive_failures.to_string()),
            ("NODES", optional(inventory.map(|i| i.nodes))),
            ("GPUS TOTAL", optional(inventory.map(|i| i.gpus_total))),
            ("GPUS ALLOCATABLE", optional(inventory.map(|i| i.gpus_allocatable))),
            (
                "DEVICE PLUGIN",
                optional(
                    inventory
                        .map(|i| if i.device_plugin_running { "running" } else { "not running" }),
                ),
            ),
            ("CREATED", short_time(&self.created_at)),
            ("UPDATED", short_time(&self.updated_at)),
        ]
    }
}

impl Tabular for ClusterEventDto {
    const COLUMNS: &'static [&'static str] = &["AT", "FROM", "TO", "REASON"];

    fn row(&self) -> Vec<String> {
        vec![
            precise_time(&self.at),
            optional(self.from_status.as_deref()),
            self.to_status.clone(),
            self.reason.clone(),
        ]
    }
}

impl Tabular for EndpointDto {
    const COLUMNS: &'static [&'static str] =
        &["ID", "NAME", "STATUS", "READY", "REASON", "PROJECT", "SINCE"];

    fn row(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.name.clone(),
            self.status.clone(),
            replicas(self),
            optional(self.reason.as_deref()),
            self.project_id.to_string(),
            short_time(&self.status_since),
        ]
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        let detail = if self.reason_detail.is_empty() { "-" } else { &self.reason_detail };
        let args = if self.engine_args.is_empty() {
            "-".to_owned()
        } else {
            self.engine_args.iter().map(|a| shell_word(a)).collect::<Vec<_>>().join(" ")
        };
        vec![
            ("ID", self.id.to_string()),
            ("NAME", self.name.clone()),
            ("PROJECT", self.project_id.to_string()),
            ("MODEL", self.model_id.to_string()),
            ("CLUSTER", self.cluster_id.to_string()),
            ("STATUS", self.status.clone()),
            ("SINCE", precise_time(&self.status_since)),
            ("REASON", optional(self.reason.as_deref())),
            ("DETAIL", detail.to_owned()),
            ("READY", format!("{} replicas ready", replicas(self))),
            ("MIN REPLICAS", self.min_replicas.to_string()),
            ("GPUS PER REPLICA", self.gpus_per_replica.to_string()),
            ("ENGINE ARGS", args),
            ("DEPLOY TIMEOUT", format!("{}s", self.deployment_timeout_secs)),
            ("CREATED", short_time(&self.created_at)),
            ("UPDATED", short_time(&self.updated_at)),
        ]
    }
}

impl Tabular for EndpointEventDto {
    const COLUMNS: &'static [&'static str] = &["AT", "KIND", "MESSAGE"];

    fn row(&self) -> Vec<String> {
        vec![precise_time(&self.at), self.kind.clone(), self.message.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use uuid::Uuid;

    fn project(name: &str, description: &str) -> ProjectDto {
        let at = Utc.with_ymd_and_hms(2025, 3, 14, 9, 26, 53).unwrap();
        ProjectDto {
            id: Uuid::nil(),
            name: name.to_owned(),
            description: description.to_owned(),
            created_by: None,
            created_at: at,
            updated_at: at,
        }
    }

    #[test]
    fn a_list_renders_as_a_header_and_one_aligned_row_per_item() {
        let items = [project("search", "the search team"), project("chat-assistant", "")];
        let rendered = Format::Table.list(&items).unwrap();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines.len(), 3, "{rendered}");
        assert!(lines[0].starts_with("ID"), "{rendered}");
        for column in ["NAME", "DESCRIPTION", "CREATED"] {
            assert!(lines[0].contains(column), "{rendered}");
        }
        assert!(lines[1].starts_with("00000000-0000-0000-0000-000000000000  search"), "{rendered}");
        assert!(lines[1].contains("the search team"));
        assert!(lines[1].ends_with("2025-03-14 09:26"), "{rendered}");
        // Columns line up: the NAME column starts at the same offset on every line.
        let offset = lines[0].find("NAME").unwrap();
        assert_eq!(lines[2].find("chat-assistant"), Some(offset));
    }

    #[test]
    fn an_empty_list_still_shows_its_columns() {
        let rendered = Format::Table.list::<ProjectDto>(&[]).unwrap();
        assert_eq!(rendered.lines().count(), 1);
        assert!(rendered.starts_with("ID"));
    }

    #[test]
    fn json_output_is_the_list_shape_without_a_cursor() {
        let rendered = Format::Json.list(&[project("search", "")]).unwrap();
        let value: serde_json::Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(value["data"][0]["name"], "search");
        assert_eq!(value["data"][0]["created_at"], "2025-03-14T09:26:53Z");
        assert!(value.get("next_cursor").is_none());
    }

    #[test]
    fn one_resource_renders_as_field_value_lines() {
        let rendered = Format::Table.one(&project("search", "the search team")).unwrap();
        assert!(
            rendered.lines().any(|l| l.starts_with("NAME") && l.ends_with("search")),
            "{rendered}"
        );
        assert!(
            rendered.lines().any(|l| l.starts_with("CREATED BY") && l.ends_with('-')),
            "{rendered}"
        );
    }

    #[test]
    fn long_descriptions_are_clipped_in_lists_only() {
        let long = "x".repeat(100);
        let row = project("search", &long).row();
        assert_eq!(row[2].chars().count(), 40);
        assert!(row[2].ends_with('…'));
        assert!(Format::Table.one(&project("search", &long)).unwrap().contains(&long));
    }

    #[test]
    fn a_cluster_shows_its_inventory_in_lists_and_details() {
        let at = Utc.with_ymd_and_hms(2025, 3, 14, 9, 26, 53).unwrap();
        let mut cluster = ClusterDto {
            id: Uuid::nil(),
            name: "gpu-east".into(),
            kind: "kubernetes".into(),
            status: "NOT_AVAILABLE".into(),
            reason: "the API server did not answer".into(),
            namespace: "bud-workloads".into(),
            last_checked_at: Some(at),
            consecutive_failures: 2,
            inventory: None,
            events: vec![],
            created_at: at,
            updated_at: at,
        };
        let row = Format::Table.list(std::slice::from_ref(&cluster)).unwrap();
        assert!(
            row.lines()
                .nth(1)
                .unwrap()
                .ends_with("NOT_AVAILABLE  -      -     2025-03-14 09:26:53"),
            "{row}"
        );
        cluster.inventory = Some(bud_protocol::control::InventoryDto {
            nodes: 3,
            gpus_total: 8,
            gpus_allocatable: 6,
            device_plugin_running: true,
        });
        let shown = details(&cluster);
        for (field, value) in [
            ("REASON", "the API server did not answer"),
            ("LAST CHECK", "2025-03-14 09:26:53"),
            ("NODES", "3"),
            ("GPUS TOTAL", "8"),
            ("GPUS ALLOCATABLE", "6"),
            ("DEVICE PLUGIN", "running"),
        ] {
            assert!(
                shown.lines().any(|l| l.starts_with(field) && l.ends_with(value)),
                "{field}: {shown}"
            );
        }
        assert!(table(&[cluster]).contains("6/8"));
    }

    #[test]
    fn engine_args_are_shown_as_typed_quoting_only_what_needs_it() {
        assert_eq!(shell_word("--max-model-len=4096"), "--max-model-len=4096");
        assert_eq!(shell_word("half precision"), "'half precision'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn nothing_is_printed_for_a_bodiless_success_in_json() {
        assert_eq!(Format::Json.done("Deleted".into()).unwrap(), "");
        assert_eq!(Format::Table.done("Deleted".into()).unwrap(), "Deleted");
    }
}
