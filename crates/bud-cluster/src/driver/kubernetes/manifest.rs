//! The objects `ensure` applies for an endpoint, as a pure function of its spec so they can be
//! snapshot-tested.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, Service, ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ENGINE_PORT, GPU_RESOURCE, keys, object_name};
use crate::driver::EndpointSpec;

/// vLLM may take up to an hour (360 probes 10 s apart) to download and load its weights
/// before it first answers `/health`. The liveness probe waits for it, so a slow load is not
/// mistaken for a hung engine; the endpoint's deployment timeout still bounds the whole wait.
const STARTUP_PROBE_PERIOD_SECONDS: i32 = 10;
const STARTUP_PROBE_FAILURES: i32 = 360;

/// The Deployment and Service of `spec` in `namespace`, running `image`.
///
/// The Deployment's generation annotation is on the Deployment, not the pod template, so a
/// scale (which bumps the generation) adds or removes pods without restarting the others. The
/// selector is the endpoint id alone: it cannot change after creation, and nothing else
/// identifies the endpoint's pods.
pub fn render(spec: &EndpointSpec, namespace: &str, image: &str) -> (Deployment, Service) {
    let name = object_name(spec.id);
    let labels = labels(spec);
    let selector: BTreeMap<String, String> =
        [(keys::ENDPOINT_ID.to_owned(), spec.id.to_string())].into();
    let http_get = || HTTPGetAction {
        path: Some("/health".to_owned()),
        port: IntOrString::Int(i32::from(ENGINE_PORT)),
        ..HTTPGetAction::default()
    };

    let mut args = vec![
        "--model".to_owned(),
        model_argument(&spec.model_source).to_owned(),
        "--served-model-name".to_owned(),
        spec.served_name.clone(),
        "--port".to_owned(),
        ENGINE_PORT.to_string(),
    ];
    args.extend(spec.engine_args.iter().cloned());

    let gpus: Option<BTreeMap<String, Quantity>> = (spec.gpus_per_replica > 0)
        .then(|| [(GPU_RESOURCE.to_owned(), Quantity(spec.gpus_per_replica.to_string()))].into());

    let container = Container {
        name: keys::CONTAINER.to_owned(),
        image: Some(image.to_owned()),
        args: Some(args),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: i32::from(ENGINE_PORT),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        resources: gpus.clone().map(|gpus| ResourceRequirements {
            limits: Some(gpus.clone()),
            requests: Some(gpus),
            ..ResourceRequirements::default()
        }),
        // Nothing else probes until this passes; see STARTUP_PROBE_FAILURES.
        startup_probe: Some(Probe {
            http_get: Some(http_get()),
            period_seconds: Some(STARTUP_PROBE_PERIOD_SECONDS),
            failure_threshold: Some(STARTUP_PROBE_FAILURES),
            timeout_seconds: Some(5),
            ..Probe::default()
        }),
        readiness_probe: Some(Probe {
            http_get: Some(http_get()),
            initial_delay_seconds: Some(10),
            period_seconds: Some(5),
            timeout_seconds: Some(5),
            ..Probe::default()
        }),
        // Restarts an engine that stops answering for 30 s once it has started; a busy engine
        // still answers /health, which does not queue behind generation.
        liveness_probe: Some(Probe {
            http_get: Some(http_get()),
            period_seconds: Some(10),
            timeout_seconds: Some(5),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        // vLLM's workers share tensors through /dev/shm, whose container default (64 MiB) is
        // too small for tensor parallelism.
        volume_mounts: Some(vec![VolumeMount {
            name: "dshm".to_owned(),
            mount_path: "/dev/shm".to_owned(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };

    let deployment = Deployment {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels.clone()),
            annotations: Some([(keys::GENERATION.to_owned(), spec.generation.to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: DeploymentSpec {
            replicas: Some(i32::try_from(spec.replicas).unwrap_or(i32::MAX)),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            // GPUs are usually all taken: a rollout replaces replicas one at a time instead of
            // starting an extra one that could never be scheduled (and would read as a failure).
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(0)),
                    max_unavailable: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    // GPU node pools are commonly tainted so that only GPU workloads land there.
                    tolerations: (spec.gpus_per_replica > 0).then(|| {
                        vec![Toleration {
                            key: Some(GPU_RESOURCE.to_owned()),
                            operator: Some("Exists".to_owned()),
                            effect: Some("NoSchedule".to_owned()),
                            ..Toleration::default()
                        }]
                    }),
                    volumes: Some(vec![Volume {
                        name: "dshm".to_owned(),
                        empty_dir: Some(EmptyDirVolumeSource {
                            medium: Some("Memory".to_owned()),
                            ..EmptyDirVolumeSource::default()
                        }),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    };

    let service = Service {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: i32::from(ENGINE_PORT),
                target_port: Some(IntOrString::String("http".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    (deployment, service)
}

/// What vLLM's `--model` takes: a Hugging Face repository without the `hf://` Bud uses to say
/// where it is; anything else (`s3://`, `gs://`, `https://`, a path) as given.
fn model_argument(source: &str) -> &str {
    source.strip_prefix("hf://").unwrap_or(source)
}

fn labels(spec: &EndpointSpec) -> BTreeMap<String, String> {
    [
        (keys::NAME, keys::NAME_VALUE.to_owned()),
        (keys::MANAGED_BY, keys::MANAGED_BY_VALUE.to_owned()),
        (keys::ENDPOINT_ID, spec.id.to_string()),
        (keys::PROJECT_ID, spec.project_id.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_prefix_is_dropped_and_other_sources_pass_as_given() {
        assert_eq!(model_argument("hf://meta-llama/Llama-3.1-8B"), "meta-llama/Llama-3.1-8B");
        assert_eq!(model_argument("s3://bucket/llama"), "s3://bucket/llama");
        assert_eq!(model_argument("gs://bucket/llama"), "gs://bucket/llama");
        assert_eq!(model_argument("https://example.com/m"), "https://example.com/m");
        assert_eq!(model_argument("/models/llama"), "/models/llama");
    }
}
