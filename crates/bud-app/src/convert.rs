//! Store records to wire DTOs, at the edge.

use bud_protocol::control::{
    ApiKeyDto, AuditRecordDto, GrantDto, MemberDto, ModelDto, ProjectDto, ProviderDto, UserDto,
};
use bud_store::{ApiKey, AuditRecord, GrantRecord, Member, Model, Project, Provider, User};
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
