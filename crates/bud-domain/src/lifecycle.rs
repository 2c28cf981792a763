//! Cluster and endpoint states, the transitions between them, and the reasons an endpoint can
//! be in error. The state names are the ones operators see in the guide (`DEPLOYING`,
//! `NOT_AVAILABLE`, ...).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a cluster stands with budcluster.
///
/// REGISTERING → AVAILABLE ⇄ NOT_AVAILABLE → ERROR (after the configured retries) →
/// REGISTERING (retry or re-register); any → DELETING → gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClusterStatus {
    Registering,
    Available,
    NotAvailable,
    Error,
    Deleting,
}

/// Where an endpoint stands.
///
/// PENDING → DEPLOYING → RUNNING; DEPLOYING → ERROR (failure or deployment timeout);
/// RUNNING → ERROR (runtime failure); RUNNING → STOPPING → STOPPED; ERROR/STOPPED → DEPLOYING
/// (retry, restart); STOPPED/ERROR → deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EndpointStatus {
    Pending,
    Deploying,
    Running,
    Error,
    Stopping,
    Stopped,
}

/// Why an endpoint is in ERROR, in terms a person can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The container image could not be pulled (wrong name, no registry access).
    ImagePullFailure,
    /// No node has enough free GPUs: the replicas cannot be scheduled.
    InsufficientGpus,
    /// A volume claim stays pending: no storage class or capacity.
    VolumeClaimPending,
    /// The engine keeps exiting after it starts.
    CrashLoop,
    /// The engine process could not be started at all (bad command, missing binary).
    StartFailure,
    /// The cluster does not answer.
    ClusterUnreachable,
    /// The endpoint did not become ready within its deployment timeout.
    Timeout,
}

/// What a user asks of an endpoint; each is legal only from some states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointCommand {
    Stop,
    Start,
    Retry,
    Delete,
    Scale,
}

impl ClusterStatus {
    pub const ALL: [ClusterStatus; 5] = [
        ClusterStatus::Registering,
        ClusterStatus::Available,
        ClusterStatus::NotAvailable,
        ClusterStatus::Error,
        ClusterStatus::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClusterStatus::Registering => "REGISTERING",
            ClusterStatus::Available => "AVAILABLE",
            ClusterStatus::NotAvailable => "NOT_AVAILABLE",
            ClusterStatus::Error => "ERROR",
            ClusterStatus::Deleting => "DELETING",
        }
    }

    /// Whether the state machine allows going from `self` to `to`.
    pub fn can_become(self, to: ClusterStatus) -> bool {
        use ClusterStatus::*;
        match (self, to) {
            (Deleting, _) => false,
            (_, Deleting) => true,
            (Registering, Available | NotAvailable | Error) => true,
            (Available, NotAvailable) | (NotAvailable, Available | Error) => true,
            (Error, Registering) => true,
            // A re-registration (new kubeconfig) starts over from any live state.
            (Available | NotAvailable, Registering) => true,
            _ => false,
        }
    }

    /// Endpoints may be placed on a cluster only while it is available.
    pub fn accepts_deployments(self) -> bool {
        self == ClusterStatus::Available
    }
}

impl EndpointStatus {
    pub const ALL: [EndpointStatus; 6] = [
        EndpointStatus::Pending,
        EndpointStatus::Deploying,
        EndpointStatus::Running,
        EndpointStatus::Error,
        EndpointStatus::Stopping,
        EndpointStatus::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndpointStatus::Pending => "PENDING",
            EndpointStatus::Deploying => "DEPLOYING",
            EndpointStatus::Running => "RUNNING",
            EndpointStatus::Error => "ERROR",
            EndpointStatus::Stopping => "STOPPING",
            EndpointStatus::Stopped => "STOPPED",
        }
    }

    /// Whether the state machine allows going from `self` to `to`.
    pub fn can_become(self, to: EndpointStatus) -> bool {
        use EndpointStatus::*;
        matches!(
            (self, to),
            (Pending, Deploying)
                | (Deploying, Running | Error)
                | (Running, Error | Stopping)
                | (Stopping, Stopped)
                | (Error | Stopped, Deploying)
                // Beyond the design's list: stopping before a deployment finished, or
                // stopping an errored endpoint to clean up what is left of it.
                | (Pending | Deploying | Error, Stopping)
        )
    }

    /// Whether replicas should exist in this state: the reconciler's desired replica count
    /// is zero otherwise.
    pub fn wants_replicas(self) -> bool {
        matches!(
            self,
            EndpointStatus::Pending | EndpointStatus::Deploying | EndpointStatus::Running
        )
    }

    /// The state a command leads to from `self`, or `None` when the command is illegal here
    /// (the API answers 409 naming the current state). `Delete` and `Scale` keep the state.
    pub fn after(self, command: EndpointCommand) -> Option<EndpointStatus> {
        use EndpointStatus::*;
        match (command, self) {
            (EndpointCommand::Stop, Pending | Deploying | Running | Error) => Some(Stopping),
            (EndpointCommand::Start, Stopped) => Some(Deploying),
            (EndpointCommand::Retry, Error) => Some(Deploying),
            (EndpointCommand::Delete, Stopped | Error) => Some(self),
            (EndpointCommand::Scale, Pending | Deploying | Running | Stopped) => Some(self),
            _ => None,
        }
    }
}

impl FailureReason {
    pub const ALL: [FailureReason; 7] = [
        FailureReason::ImagePullFailure,
        FailureReason::InsufficientGpus,
        FailureReason::VolumeClaimPending,
        FailureReason::CrashLoop,
        FailureReason::StartFailure,
        FailureReason::ClusterUnreachable,
        FailureReason::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::ImagePullFailure => "image_pull_failure",
            FailureReason::InsufficientGpus => "insufficient_gpus",
            FailureReason::VolumeClaimPending => "volume_claim_pending",
            FailureReason::CrashLoop => "crash_loop",
            FailureReason::StartFailure => "start_failure",
            FailureReason::ClusterUnreachable => "cluster_unreachable",
            FailureReason::Timeout => "timeout",
        }
    }

    /// What to do about it, as the guide's solutions say.
    pub fn remedy(self) -> &'static str {
        match self {
            FailureReason::ImagePullFailure => {
                "check the image name and the cluster's access to its registry"
            }
            FailureReason::InsufficientGpus => {
                "free GPUs, add GPU nodes, or lower the endpoint's replicas or GPU count"
            }
            FailureReason::VolumeClaimPending => "check the storage class and its provisioner",
            FailureReason::CrashLoop => "read the endpoint's logs; the engine exits after starting",
            FailureReason::StartFailure => {
                "check the engine command and its arguments; read the endpoint's logs"
            }
            FailureReason::ClusterUnreachable => "check the cluster's connectivity and kubeconfig",
            FailureReason::Timeout => {
                "the endpoint was not ready in time; read its logs and events, then retry"
            }
        }
    }
}

str_enum!(ClusterStatus, "status");
str_enum!(EndpointStatus, "status");
str_enum!(FailureReason, "reason");

impl fmt::Display for EndpointCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EndpointCommand::Stop => "stop",
            EndpointCommand::Start => "start",
            EndpointCommand::Retry => "retry",
            EndpointCommand::Delete => "delete",
            EndpointCommand::Scale => "scale",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn endpoint_lifecycle_of_the_design() {
        use EndpointStatus::*;
        for (from, to) in [
            (Pending, Deploying),
            (Deploying, Running),
            (Deploying, Error),
            (Running, Error),
            (Running, Stopping),
            (Stopping, Stopped),
            (Error, Deploying),
            (Stopped, Deploying),
        ] {
            assert!(from.can_become(to), "{from} -> {to}");
        }
        for (from, to) in
            [(Pending, Running), (Stopped, Running), (Stopping, Running), (Error, Running)]
        {
            assert!(!from.can_become(to), "{from} -> {to}");
        }
    }

    #[test]
    fn commands_are_legal_only_from_some_states() {
        use EndpointStatus::*;
        assert_eq!(Running.after(EndpointCommand::Stop), Some(Stopping));
        assert_eq!(Stopped.after(EndpointCommand::Start), Some(Deploying));
        assert_eq!(Error.after(EndpointCommand::Retry), Some(Deploying));
        assert_eq!(Running.after(EndpointCommand::Delete), None);
        assert_eq!(Running.after(EndpointCommand::Start), None);
        assert_eq!(Stopping.after(EndpointCommand::Scale), None);
    }

    #[test]
    fn cluster_lifecycle_of_the_design() {
        use ClusterStatus::*;
        assert!(Registering.can_become(Available));
        assert!(Available.can_become(NotAvailable));
        assert!(NotAvailable.can_become(Available));
        assert!(NotAvailable.can_become(Error));
        assert!(Error.can_become(Registering));
        assert!(!Error.can_become(Available), "an errored cluster is retried through REGISTERING");
        assert!(!Deleting.can_become(Available));
    }

    proptest! {
        /// Every state a command leads to is reachable by the state machine (or is the same
        /// state), so commands never bypass the transitions.
        #[test]
        fn commands_follow_the_state_machine(s in 0usize..6, c in 0usize..5) {
            let commands = [EndpointCommand::Stop, EndpointCommand::Start, EndpointCommand::Retry, EndpointCommand::Delete, EndpointCommand::Scale];
            let from = EndpointStatus::ALL[s];
            if let Some(to) = from.after(commands[c]) {
                prop_assert!(to == from || from.can_become(to), "{} -> {}", from, to);
            }
        }

        #[test]
        fn every_reason_has_a_remedy_and_parses_back(r in 0usize..7) {
            let reason = FailureReason::ALL[r];
            prop_assert!(!reason.remedy().is_empty());
            prop_assert_eq!(reason.as_str().parse::<FailureReason>().unwrap(), reason);
        }
    }
}
