//! Store records to wire DTOs, at the edge.

use bud_protocol::control::{
    ApiKeyDto, AuditRecordDto, ClusterDto, ClusterEventDto, EndpointDto, EndpointEventDto,
    GrantDto, InventoryDto, MemberDto, ModelDto, ProjectDto, ProviderDto, RouteDto, RouteTargetDto,
    UsageRowDto, UserDto,
};
use bud_protocol::gateway::{
    GatewayConfigDto, GatewayEndpointDto, GatewayKeyDto, GatewayProviderDto, GatewayRouteDto,
};
use bud_store::{
    ApiKey, AuditRecord, Cluster, ClusterEvent, Endpoint, EndpointEvent, GatewayConfigRecord,
    GrantRecord, Member, Model, Project, Provider, Route, RouteTarget, RouteUpstream,
    UsageSummaryRow, User,
};
use chrono::Utc;

pub fn user(u: User) -> UserDto {
    UserDto {
        id: u.id.as_uuid(),
        email: u.email.to_string(),
        name: u.name.to_string(),
        role: u.role.to_string(),
        external: u.issuer.is_some(),
        disabled: u.disabled_at.is_some(),
        created_at: u.created_at,
        updated_at: u.updated_at,
    }
}

pub fn grant(g: GrantRecord) -> GrantDto {
    GrantDto {
        id: g.id.as_uuid(),
        permission: g.grant.permission().to_string(),
        project_id: g.grant.project_id().map(|p| p.as_uuid()),
        granted_by: g.granted_by.map(|u| u.as_uuid()),
        created_at: g.created_at,
    }
}

pub fn project(p: Project) -> ProjectDto {
    ProjectDto {
        id: p.id.as_uuid(),
        name: p.name.to_string(),
        description: p.description,
        created_by: p.created_by.map(|u| u.as_uuid()),
        created_at: p.created_at,
        updated_at: p.updated_at,
    }
}

pub fn member(m: Member) -> MemberDto {
    MemberDto {
        user_id: m.user_id.as_uuid(),
        email: m.email.to_string(),
        name: m.name.to_string(),
        added_at: m.added_at,
    }
}

pub fn model(m: Model) -> ModelDto {
    ModelDto {
        id: m.id.as_uuid(),
        name: m.name.to_string(),
        source_uri: m.source_uri.to_string(),
        engine: m.engine.to_string(),
        modality: m.modality.to_string(),
        description: m.description,
        created_at: m.created_at,
        updated_at: m.updated_at,
    }
}

pub fn provider(p: Provider) -> ProviderDto {
    ProviderDto {
        id: p.id.as_uuid(),
        name: p.name.to_string(),
        base_url: p.base_url,
        api_key_set: !p.api_key_ciphertext.is_empty(),
        created_at: p.created_at,
        updated_at: p.updated_at,
    }
}

pub fn api_key(k: ApiKey) -> ApiKeyDto {
    let now = Utc::now();
    let status = if k.revoked_at.is_some() {
        "revoked"
    } else if k.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    };
    ApiKeyDto {
        id: k.id.as_uuid(),
        project_id: k.project_id.as_uuid(),
        name: k.name.to_string(),
        prefix: k.prefix,
        status: status.to_owned(),
        created_by: k.created_by.map(|u| u.as_uuid()),
        created_at: k.created_at,
        expires_at: k.expires_at,
        revoked_at: k.revoked_at,
        rpm_limit: k.rpm_limit,
        tpm_limit: k.tpm_limit,
    }
}

pub fn audit(r: AuditRecord) -> AuditRecordDto {
    let e = r.event;
    AuditRecordDto {
        seq: r.seq,
        at: e.at,
        actor_id: e.actor_id.map(|u| u.as_uuid()),
        actor: e.actor,
        action: e.action,
        resource_type: e.resource_type,
        resource_id: e.resource_id,
        project_id: e.project_id.map(|p| p.as_uuid()),
        details: e.details,
        request_id: e.request_id,
        prev_hash: r.prev_hash,
        hash: r.hash,
    }
}

pub fn cluster(c: Cluster, events: Vec<ClusterEvent>) -> ClusterDto {
    ClusterDto {
        id: c.id.as_uuid(),
        name: c.name.to_string(),
        kind: c.kind.as_str().to_owned(),
        status: c.status.to_string(),
        reason: c.reason,
        namespace: c.namespace,
        last_checked_at: c.last_checked_at,
        consecutive_failures: c.consecutive_failures,
        inventory: c.inventory.map(|i| InventoryDto {
            nodes: i.nodes,
            gpus_total: i.gpus_total,
            gpus_allocatable: i.gpus_allocatable,
            device_plugin_running: i.device_plugin_running,
        }),
        events: events
            .into_iter()
            .map(|e| ClusterEventDto {
                at: e.at,
                from_status: e.from_status.map(|s| s.to_string()),
                to_status: e.to_status.to_string(),
                reason: e.reason,
            })
            .collect(),
        created_at: c.created_at,
        updated_at: c.updated_at,
    }
}

pub fn endpoint(e: Endpoint, events: Vec<EndpointEvent>) -> EndpointDto {
    EndpointDto {
        id: e.id.as_uuid(),
        project_id: e.project_id.as_uuid(),
        model_id: e.model_id.as_uuid(),
        cluster_id: e.cluster_id.as_uuid(),
        name: e.name.to_string(),
        status: e.status.to_string(),
        reason: e.reason.map(|r| r.to_string()),
        reason_detail: e.reason_detail,
        replicas_desired: e.replicas,
        replicas_ready: e.ready_replicas,
        min_replicas: e.min_replicas,
        gpus_per_replica: e.gpus_per_replica,
        engine_args: e.engine_args,
        deployment_timeout_secs: e.deployment_timeout_secs,
        status_since: e.status_since,
        events: events
            .into_iter()
            .map(|v| EndpointEventDto { at: v.at, kind: v.kind, message: v.message })
            .collect(),
        created_at: e.created_at,
        updated_at: e.updated_at,
    }
}

pub fn route_target(t: RouteTarget) -> RouteTargetDto {
    let (endpoint_id, provider_id, model) = match t.upstream {
        RouteUpstream::Endpoint(id) => (Some(id.as_uuid()), None, None),
        RouteUpstream::Provider { id, model } => (None, Some(id.as_uuid()), Some(model)),
    };
    RouteTargetDto { endpoint_id, provider_id, model, weight: i64::from(t.weight) }
}

pub fn route(r: Route) -> RouteDto {
    RouteDto {
        id: r.id.as_uuid(),
        project_id: r.project_id.as_uuid(),
        name: r.name.to_string(),
        targets: r.targets.into_iter().map(route_target).collect(),
        fallbacks: r.fallbacks.into_iter().map(route_target).collect(),
        rpm_limit: r.rpm_limit,
        tpm_limit: r.tpm_limit,
        created_by: r.created_by.map(|u| u.as_uuid()),
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

pub fn usage_row(r: UsageSummaryRow) -> UsageRowDto {
    UsageRowDto {
        group: r.group,
        requests: r.requests,
        errors: r.errors,
        prompt_tokens: r.prompt_tokens,
        completion_tokens: r.completion_tokens,
        total_tokens: r.prompt_tokens.saturating_add(r.completion_tokens),
        avg_latency_ms: r.avg_latency_ms,
    }
}

/// The gateway's configuration on the wire; provider keys stay sealed.
pub fn gateway_config(c: GatewayConfigRecord) -> GatewayConfigDto {
    GatewayConfigDto {
        version: c.version,
        keys: c
            .keys
            .into_iter()
            .map(|k| GatewayKeyDto {
                id: k.id.as_uuid(),
                project_id: k.project_id.as_uuid(),
                hash: k.hash,
                expires_at: k.expires_at,
                rpm_limit: k.rpm_limit,
                tpm_limit: k.tpm_limit,
            })
            .collect(),
        routes: c
            .routes
            .into_iter()
            .map(|r| GatewayRouteDto {
                id: r.id.as_uuid(),
                project_id: r.project_id.as_uuid(),
                name: r.name,
                targets: r.targets.into_iter().map(route_target).collect(),
                fallbacks: r.fallbacks.into_iter().map(route_target).collect(),
                rpm_limit: r.rpm_limit,
                tpm_limit: r.tpm_limit,
            })
            .collect(),
        endpoints: c
            .endpoints
            .into_iter()
            .map(|e| GatewayEndpointDto {
                id: e.id.as_uuid(),
                project_id: e.project_id.as_uuid(),
                model_name: e.model_name,
                addresses: e.addresses,
            })
            .collect(),
        providers: c
            .providers
            .into_iter()
            .map(|p| GatewayProviderDto {
                id: p.id.as_uuid(),
                base_url: p.base_url,
                api_key_ciphertext: p.api_key_ciphertext,
            })
            .collect(),
    }
}
