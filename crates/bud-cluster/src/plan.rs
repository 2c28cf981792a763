//! The reconciler's decision, as a pure function: from the endpoints the store says should
//! exist on a cluster and what the driver observes there, the actions that make them agree.
//!
//! `plan` does no IO and reads no clock (the caller passes `now`), so every rule below is unit
//! tested on its own. When desired and observed agree it returns nothing: a pass that finds
//! nothing to change writes nothing.

use bud_domain::{EndpointId, EndpointStatus, FailureReason, Timestamp};
use bud_store::{Endpoint, StatusChange};

use crate::driver::{Observation, ObservedEndpoint};

/// One step for the reconciler to apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Make the endpoint run its replicas at its current generation.
    Ensure { endpoint: EndpointId },
    /// Remove everything the endpoint runs.
    Remove { endpoint: EndpointId },
    /// Move the endpoint to another status, if it is still at `change.from` and `generation`.
    Transition { endpoint: EndpointId, change: StatusChange, generation: i64 },
    /// Record how many replicas answer their health check and where they answer (sorted), for
    /// the gateway.
    SetReady { endpoint: EndpointId, ready: i64, addresses: Vec<String> },
}

/// What the reconciler knows about the cluster as a whole this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterReach {
    /// `observe` answered: the observation is complete.
    Reachable,
    /// `observe` failed: nothing is known about what runs there.
    Unreachable,
}

/// Decides the actions for one cluster.
pub fn plan(
    desired: &[Endpoint],
    observed: &Observation,
    reach: ClusterReach,
    now: Timestamp,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for endpoint in desired {
        let seen = observed.get(&endpoint.id);
        match reach {
            ClusterReach::Reachable => plan_endpoint(endpoint, seen, now, &mut actions),
            ClusterReach::Unreachable => plan_blind(endpoint, now, &mut actions),
        }
    }
    if reach == ClusterReach::Reachable {
        // Anything running that no endpoint wants: deleted endpoints, leftovers of a crash.
        let mut orphans: Vec<EndpointId> =
            observed.keys().filter(|id| !desired.iter().any(|e| e.id == **id)).copied().collect();
        orphans.sort();
        actions.extend(orphans.into_iter().map(|endpoint| Action::Remove { endpoint }));
    }
    actions
}

fn plan_endpoint(
    e: &Endpoint,
    seen: Option<&ObservedEndpoint>,
    now: Timestamp,
    out: &mut Vec<Action>,
) {
    let ready = seen.map_or(0, |s| i64::from(s.ready));
    let addresses = seen.map(|s| sorted(&s.addresses)).unwrap_or_default();
    // Stored addresses are sorted (the store keeps them so); sorted again so an endpoint record
    // from elsewhere compares the same.
    let observed_changed = ready != e.ready_replicas || addresses != sorted(&e.addresses);
    let stored_empty = e.ready_replicas == 0 && e.addresses.is_empty();
    let exists = seen.is_some_and(|s| s.replicas > 0);
    let drifted = match seen {
        None => true,
        Some(s) => s.generation != e.generation || i64::from(s.replicas) != e.replicas,
    };
    match e.status {
        EndpointStatus::Pending => {
            out.push(Action::Ensure { endpoint: e.id });
            out.push(transition(
                e,
                EndpointStatus::Deploying,
                None,
                String::new(),
                now,
                "deploying",
            ));
        }
        EndpointStatus::Deploying | EndpointStatus::Running => {
            // A failure seen for an older spec (before a retry or restart bumped the
            // generation) says nothing about the new one: the replicas are replaced first.
            let current = seen.filter(|s| s.generation == e.generation);
            if let Some((reason, detail)) = current.and_then(|s| s.failure.clone()) {
                let message = format!("{}: {detail}", reason.remedy());
                out.push(transition(e, EndpointStatus::Error, Some(reason), detail, now, &message));
                return;
            }
            if drifted {
                out.push(Action::Ensure { endpoint: e.id });
            }
            if observed_changed {
                out.push(Action::SetReady { endpoint: e.id, ready, addresses });
            }
            if e.status == EndpointStatus::Deploying {
                if ready >= e.replicas && !drifted {
                    out.push(transition(
                        e,
                        EndpointStatus::Running,
                        None,
                        String::new(),
                        now,
                        "all replicas ready",
                    ));
                } else if timed_out(e, now) {
                    let detail = format!(
                        "{ready} of {} replicas ready after {}s",
                        e.replicas, e.deployment_timeout_secs
                    );
                    out.push(transition(
                        e,
                        EndpointStatus::Error,
                        Some(FailureReason::Timeout),
                        detail.clone(),
                        now,
                        &detail,
                    ));
                }
            }
        }
        EndpointStatus::Stopping => {
            if exists {
                out.push(Action::Remove { endpoint: e.id });
            } else {
                out.push(transition(
                    e,
                    EndpointStatus::Stopped,
                    None,
                    String::new(),
                    now,
                    "stopped",
                ));
            }
            if !stored_empty && ready == 0 {
                out.push(Action::SetReady { endpoint: e.id, ready: 0, addresses: vec![] });
            }
        }
        EndpointStatus::Stopped | EndpointStatus::Error => {
            if exists {
                out.push(Action::Remove { endpoint: e.id });
            }
            if !stored_empty {
                out.push(Action::SetReady { endpoint: e.id, ready: 0, addresses: vec![] });
            }
        }
    }
}

/// The cluster did not answer: change nothing on it, but a deployment still times out, as a
/// cluster that cannot be reached.
fn plan_blind(e: &Endpoint, now: Timestamp, out: &mut Vec<Action>) {
    if matches!(e.status, EndpointStatus::Pending | EndpointStatus::Deploying) && timed_out(e, now)
    {
        let detail = format!(
            "the cluster did not answer for the {}s deployment timeout",
            e.deployment_timeout_secs
        );
        out.push(transition(
            e,
            EndpointStatus::Error,
            Some(FailureReason::ClusterUnreachable),
            detail.clone(),
            now,
            &detail,
        ));
    }
}

fn sorted(addresses: &[String]) -> Vec<String> {
    let mut sorted = addresses.to_vec();
    sorted.sort();
    sorted
}

fn timed_out(e: &Endpoint, now: Timestamp) -> bool {
    (now - e.status_since).num_seconds() >= e.deployment_timeout_secs
}

fn transition(
    e: &Endpoint,
    to: EndpointStatus,
    reason: Option<FailureReason>,
    reason_detail: String,
    at: Timestamp,
    message: &str,
) -> Action {
    Action::Transition {
        endpoint: e.id,
        change: StatusChange {
            from: e.status,
            to,
            reason,
            reason_detail,
            at,
            message: message.to_owned(),
        },
        generation: e.generation,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bud_domain::{ClusterId, ModelId, Name, ProjectId};
    use chrono::{Duration, Utc};
    use proptest::prelude::*;

    use super::*;

    fn endpoint(status: EndpointStatus, replicas: i64, ready: i64) -> Endpoint {
        let now = Utc::now();
        Endpoint {
            id: EndpointId::new(),
            project_id: ProjectId::new(),
            model_id: ModelId::new(),
            cluster_id: ClusterId::new(),
            name: Name::parse("name", "e").unwrap(),
            replicas,
            min_replicas: 0,
            engine_args: vec![],
            gpus_per_replica: 0,
            deployment_timeout_secs: 600,
            status,
            reason: None,
            reason_detail: String::new(),
            status_since: now,
            ready_replicas: ready,
            addresses: addrs(u32::try_from(ready).unwrap()),
            generation: 1,
            created_by: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Addresses of `n` ready replicas, as the drivers report them.
    fn addrs(n: u32) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:8000")).collect()
    }

    fn seen(e: &Endpoint, replicas: u32, ready: u32) -> Observation {
        let o = ObservedEndpoint {
            generation: e.generation,
            replicas,
            ready,
            failure: None,
            addresses: addrs(ready),
        };
        HashMap::from([(e.id, o)])
    }

    fn statuses(actions: &[Action]) -> Vec<EndpointStatus> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Transition { change, .. } => Some(change.to),
                _ => None,
            })
            .collect()
    }

    const UP: ClusterReach = ClusterReach::Reachable;

    #[test]
    fn pending_deploys() {
        let e = endpoint(EndpointStatus::Pending, 2, 0);
        let a = plan(std::slice::from_ref(&e), &HashMap::new(), UP, Utc::now());
        assert_eq!(a[0], Action::Ensure { endpoint: e.id });
        assert_eq!(statuses(&a), vec![EndpointStatus::Deploying]);
    }

    #[test]
    fn deploying_becomes_running_when_all_replicas_are_ready() {
        let e = endpoint(EndpointStatus::Deploying, 2, 1);
        let a = plan(std::slice::from_ref(&e), &seen(&e, 2, 2), UP, Utc::now());
        assert_eq!(statuses(&a), vec![EndpointStatus::Running]);
        assert!(a.contains(&Action::SetReady { endpoint: e.id, ready: 2, addresses: addrs(2) }));
        assert!(!a.contains(&Action::Ensure { endpoint: e.id }));
    }

    #[test]
    fn deploying_times_out() {
        let mut e = endpoint(EndpointStatus::Deploying, 2, 0);
        e.status_since = Utc::now() - Duration::seconds(601);
        let a = plan(std::slice::from_ref(&e), &seen(&e, 2, 1), UP, Utc::now());
        let Some(Action::Transition { change, .. }) =
            a.iter().find(|a| matches!(a, Action::Transition { .. }))
        else {
            panic!("no transition: {a:?}")
        };
        assert_eq!(
            (change.to, change.reason),
            (EndpointStatus::Error, Some(FailureReason::Timeout))
        );
        assert!(change.reason_detail.contains("1 of 2"), "{}", change.reason_detail);
    }

    #[test]
    fn a_driver_failure_becomes_an_error_with_its_reason() {
        let e = endpoint(EndpointStatus::Deploying, 1, 0);
        let mut o = seen(&e, 1, 0);
        o.get_mut(&e.id).unwrap().failure =
            Some((FailureReason::ImagePullFailure, "ErrImagePull: vllm:nope".into()));
        let a = plan(std::slice::from_ref(&e), &o, UP, Utc::now());
        let Action::Transition { change, .. } = &a[0] else { panic!("{a:?}") };
        assert_eq!(change.reason, Some(FailureReason::ImagePullFailure));
        assert!(
            change.message.contains("registry"),
            "the message carries the remedy: {}",
            change.message
        );
    }

    #[test]
    fn a_failure_of_an_older_generation_is_not_held_against_a_retry() {
        let mut e = endpoint(EndpointStatus::Deploying, 1, 0);
        let mut o = seen(&e, 1, 0);
        o.get_mut(&e.id).unwrap().failure = Some((FailureReason::StartFailure, "exit 3".into()));
        e.generation = 2;
        let a = plan(std::slice::from_ref(&e), &o, UP, Utc::now());
        assert_eq!(a, vec![Action::Ensure { endpoint: e.id }]);
    }

    #[test]
    fn running_with_a_lost_replica_is_ensured_and_stays_running() {
        let e = endpoint(EndpointStatus::Running, 2, 2);
        let a = plan(std::slice::from_ref(&e), &seen(&e, 1, 1), UP, Utc::now());
        assert_eq!(
            a,
            vec![
                Action::Ensure { endpoint: e.id },
                Action::SetReady { endpoint: e.id, ready: 1, addresses: addrs(1) }
            ]
        );
    }

    #[test]
    fn scale_or_spec_change_is_ensured() {
        let mut e = endpoint(EndpointStatus::Running, 3, 2);
        let o = seen(&e, 2, 2);
        assert_eq!(
            plan(std::slice::from_ref(&e), &o, UP, Utc::now()),
            vec![Action::Ensure { endpoint: e.id }]
        );
        e.replicas = 2;
        e.generation = 2;
        assert_eq!(
            plan(std::slice::from_ref(&e), &o, UP, Utc::now()),
            vec![Action::Ensure { endpoint: e.id }]
        );
    }

    #[test]
    fn stopping_removes_then_stops() {
        let e = endpoint(EndpointStatus::Stopping, 2, 2);
        let a = plan(std::slice::from_ref(&e), &seen(&e, 2, 2), UP, Utc::now());
        assert_eq!(a, vec![Action::Remove { endpoint: e.id }]);
        let a = plan(std::slice::from_ref(&e), &HashMap::new(), UP, Utc::now());
        assert_eq!(statuses(&a), vec![EndpointStatus::Stopped]);
        assert!(a.contains(&Action::SetReady { endpoint: e.id, ready: 0, addresses: vec![] }));
    }

    #[test]
    fn stopped_and_errored_endpoints_run_nothing() {
        for status in [EndpointStatus::Stopped, EndpointStatus::Error] {
            let e = endpoint(status, 2, 0);
            assert_eq!(
                plan(std::slice::from_ref(&e), &seen(&e, 1, 0), UP, Utc::now()),
                vec![Action::Remove { endpoint: e.id }]
            );
            assert!(plan(std::slice::from_ref(&e), &HashMap::new(), UP, Utc::now()).is_empty());
        }
    }

    #[test]
    fn a_replaced_replica_is_a_change_of_addresses_alone() {
        let e = endpoint(EndpointStatus::Running, 2, 2);
        let mut o = seen(&e, 2, 2);
        o.get_mut(&e.id).unwrap().addresses = vec!["10.0.0.9:8000".into(), "10.0.0.0:8000".into()];
        let a = plan(std::slice::from_ref(&e), &o, UP, Utc::now());
        let moved = vec!["10.0.0.0:8000".to_owned(), "10.0.0.9:8000".to_owned()];
        assert_eq!(a, vec![Action::SetReady { endpoint: e.id, ready: 2, addresses: moved }]);
    }

    #[test]
    fn addresses_in_another_order_are_no_change() {
        let e = endpoint(EndpointStatus::Running, 3, 3);
        let mut o = seen(&e, 3, 3);
        o.get_mut(&e.id).unwrap().addresses.reverse();
        assert!(plan(std::slice::from_ref(&e), &o, UP, Utc::now()).is_empty());
    }

    #[test]
    fn endpoints_that_stopped_forget_their_addresses() {
        for status in [EndpointStatus::Stopped, EndpointStatus::Error, EndpointStatus::Stopping] {
            let mut e = endpoint(status, 1, 0);
            e.addresses = addrs(1);
            let a = plan(std::slice::from_ref(&e), &HashMap::new(), UP, Utc::now());
            assert!(
                a.contains(&Action::SetReady { endpoint: e.id, ready: 0, addresses: vec![] }),
                "{status}: {a:?}"
            );
        }
    }

    #[test]
    fn orphans_are_removed() {
        let ghost = endpoint(EndpointStatus::Running, 1, 1);
        let a = plan(&[], &seen(&ghost, 1, 1), UP, Utc::now());
        assert_eq!(a, vec![Action::Remove { endpoint: ghost.id }]);
    }

    #[test]
    fn an_unreachable_cluster_changes_nothing_until_the_timeout() {
        let mut e = endpoint(EndpointStatus::Deploying, 1, 0);
        let running = endpoint(EndpointStatus::Running, 1, 1);
        assert!(
            plan(
                &[e.clone(), running.clone()],
                &HashMap::new(),
                ClusterReach::Unreachable,
                Utc::now()
            )
            .is_empty()
        );
        e.status_since = Utc::now() - Duration::seconds(601);
        let a = plan(&[e.clone(), running], &HashMap::new(), ClusterReach::Unreachable, Utc::now());
        let Action::Transition { change, .. } = &a[0] else { panic!("{a:?}") };
        assert_eq!(change.reason, Some(FailureReason::ClusterUnreachable));
        assert_eq!(a.len(), 1, "no orphan removal on a blind pass");
    }

    fn arb_status() -> impl Strategy<Value = EndpointStatus> {
        (0usize..6).prop_map(|i| EndpointStatus::ALL[i])
    }

    proptest! {
        /// Once observation matches the spec, a second plan over the same state changes
        /// nothing: converged endpoints cost no writes.
        #[test]
        fn converged_state_plans_nothing(status in arb_status(), replicas in 1i64..5) {
            let converged_status = match status {
                EndpointStatus::Pending | EndpointStatus::Deploying | EndpointStatus::Running => EndpointStatus::Running,
                EndpointStatus::Stopping | EndpointStatus::Stopped => EndpointStatus::Stopped,
                EndpointStatus::Error => EndpointStatus::Error,
            };
            let ready = if converged_status == EndpointStatus::Running { replicas } else { 0 };
            let e = endpoint(converged_status, replicas, ready);
            let observed = if ready > 0 { seen(&e, replicas as u32, ready as u32) } else { HashMap::new() };
            prop_assert!(plan(&[e], &observed, UP, Utc::now()).is_empty());
        }

        /// Every transition the planner proposes is one the state machine allows.
        #[test]
        fn transitions_follow_the_state_machine(status in arb_status(), replicas in 1i64..4, obs_replicas in 0u32..4, obs_ready in 0u32..4, failed in any::<bool>(), old in any::<bool>()) {
            let mut e = endpoint(status, replicas, 0);
            if old { e.status_since = Utc::now() - Duration::seconds(3600); }
            let mut o = seen(&e, obs_replicas, obs_ready.min(obs_replicas));
            if failed { o.get_mut(&e.id).unwrap().failure = Some((FailureReason::CrashLoop, "x".into())); }
            for a in plan(std::slice::from_ref(&e), &o, UP, Utc::now()) {
                if let Action::Transition { change, .. } = a {
                    prop_assert_eq!(change.from, e.status);
                    prop_assert!(e.status.can_become(change.to), "{} -> {}", e.status, change.to);
                }
            }
        }
    }
}
