//! What a pod's status says about its replica: running, ready, or failed in a way that waiting
//! will not fix. Pure, so each mapping is unit-tested on the JSON a cluster answers.

use bud_domain::FailureReason;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use super::keys;

/// Container waiting reasons that mean the image cannot be had.
const IMAGE_PULL_REASONS: [&str; 3] = ["ImagePullBackOff", "ErrImagePull", "InvalidImageName"];
/// Container waiting reasons that mean the container could not be created or started.
const START_REASONS: [&str; 2] = ["CreateContainerError", "RunContainerError"];

/// Whether the pod runs (for the device plugin).
pub(super) fn is_running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// Whether the pod passes its readiness probe and is not being deleted.
pub(super) fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && condition(pod, "Ready").is_some_and(|(status, _, _)| status == "True")
}

/// Whether the engine container is waiting to restart after a failed run, so its logs are in
/// the previous run.
pub(super) fn crashed_before(pod: &Pod) -> bool {
    engine_status(pod).is_some_and(|c| {
        c.restart_count > 0 && c.state.as_ref().is_some_and(|s| s.waiting.is_some())
    })
}

/// The failure the pod shows, if any, with what the cluster said. A pod being deleted shows
/// none: it belongs to a replica that is going away.
pub(super) fn failure(pod: &Pod) -> Option<(FailureReason, String)> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    if let Some((status, reason, message)) = condition(pod, "PodScheduled")
        && status == "False"
        && reason == "Unschedulable"
    {
        let lower = message.to_ascii_lowercase();
        // A claim check first: the scheduler lists every unmet condition in one message.
        if lower.contains("persistentvolumeclaim") || lower.contains("unbound") {
            return Some((FailureReason::VolumeClaimPending, message.to_owned()));
        }
        if lower.contains("nvidia.com/gpu") || lower.contains("insufficient") {
            return Some((FailureReason::InsufficientGpus, message.to_owned()));
        }
    }
    let container = engine_status(pod)?;
    let waiting = container.state.as_ref()?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref().unwrap_or("");
    let message = waiting.message.as_deref().unwrap_or("");
    if IMAGE_PULL_REASONS.contains(&reason) {
        let image = container.image.as_str();
        let detail = match (message.is_empty(), message.contains(image)) {
            (true, _) => format!("{reason}: image {image:?}"),
            (false, true) => format!("{reason}: {message}"),
            (false, false) => format!("{reason}: image {image:?}: {message}"),
        };
        return Some((FailureReason::ImagePullFailure, detail));
    }
    if reason == "CrashLoopBackOff" {
        return Some((FailureReason::CrashLoop, crash_detail(container)));
    }
    if START_REASONS.contains(&reason) {
        return Some((FailureReason::StartFailure, format!("{reason}: {message}")));
    }
    None
}

/// How the last run ended: `restarted 5 times; last exit code 1 (Error): <message>`.
fn crash_detail(container: &ContainerStatus) -> String {
    let mut detail = format!("restarted {} times", container.restart_count);
    let last = container.last_state.as_ref().and_then(|s| s.terminated.as_ref());
    if let Some(t) = last {
        detail.push_str(&format!("; last exit code {}", t.exit_code));
        if let Some(reason) = t.reason.as_deref().filter(|r| !r.is_empty()) {
            detail.push_str(&format!(" ({reason})"));
        }
        if let Some(message) = t.message.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
            detail.push_str(&format!(": {message}"));
        }
    }
    detail
}

fn engine_status(pod: &Pod) -> Option<&ContainerStatus> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find(|c| c.name == keys::CONTAINER).or_else(|| statuses.first())
}

/// A condition's status, reason and message.
fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<(&'a str, &'a str, &'a str)> {
    let c = pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == kind)?;
    Some((c.status.as_str(), c.reason.as_deref().unwrap_or(""), c.message.as_deref().unwrap_or("")))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "p" },
            "status": status,
        }))
        .unwrap()
    }

    fn waiting(reason: &str, message: &str) -> Pod {
        pod(json!({
            "phase": "Pending",
            "containerStatuses": [{
                "name": "vllm", "image": "vllm/vllm-openai:nope", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": { "waiting": { "reason": reason, "message": message } },
            }],
        }))
    }

    fn unschedulable(message: &str) -> Pod {
        pod(json!({
            "phase": "Pending",
            "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": message,
            }],
        }))
    }

    #[test]
    fn image_pull_failures_name_the_image() {
        for reason in IMAGE_PULL_REASONS {
            let (r, detail) = failure(&waiting(reason, "")).unwrap();
            assert_eq!(r, FailureReason::ImagePullFailure);
            assert!(detail.contains("vllm/vllm-openai:nope"), "{detail}");
        }
        let (_, detail) = failure(&waiting("ErrImagePull", "rpc error: not found")).unwrap();
        assert_eq!(detail, "ErrImagePull: image \"vllm/vllm-openai:nope\": rpc error: not found");
    }

    #[test]
    fn unschedulable_pods_say_why() {
        let gpu = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.";
        assert_eq!(
            failure(&unschedulable(gpu)),
            Some((FailureReason::InsufficientGpus, gpu.to_owned()))
        );
        let pvc = "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims.";
        assert_eq!(
            failure(&unschedulable(pvc)),
            Some((FailureReason::VolumeClaimPending, pvc.to_owned()))
        );
        // Taints and selectors may be fixed by a new node: left to the deployment timeout.
        assert_eq!(
            failure(&unschedulable("0/3 nodes are available: 3 node(s) had untolerated taint.")),
            None
        );
    }

    #[test]
    fn start_errors_are_start_failures() {
        let (r, _) = failure(&waiting("RunContainerError", "exec: not found")).unwrap();
        assert_eq!(r, FailureReason::StartFailure);
        assert_eq!(failure(&waiting("ContainerCreating", "")), None);
    }

    #[test]
    fn a_pod_being_deleted_shows_no_failure_and_is_not_ready() {
        let mut p = waiting("CrashLoopBackOff", "back-off");
        p.metadata.deletion_timestamp =
            Some(serde_json::from_value(json!("2025-01-01T00:00:00Z")).unwrap());
        assert_eq!(failure(&p), None);
        assert!(!is_ready(&p));
    }
}
