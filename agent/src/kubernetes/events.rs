//! Events on `DiskChain` resources, for `kubectl describe dc`: an `events.k8s.io/v1` Event per
//! thing that happened, and the same event again (same type, reason, action and note, within
//! [`REPEAT_WITHIN`]) folded into the first one's `series` count, as Kubernetes' own components
//! do, rather than a new object.
//!
//! kube-runtime's `Recorder` folds by type, reason and action alone and keeps the first event's
//! note, so "step 2/3 started" would show as a second count of "step 1/3 started"; here the
//! note is part of what makes two events the same.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Client};

/// How long a repeat of an event counts in the first one's series (Kubernetes keeps events an
/// hour by default; a repeat after that is a new event).
pub const REPEAT_WITHIN: Duration = Duration::from_secs(30 * 60);

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    regarding: (Option<String>, Option<String>, Option<String>),
    warning: bool,
    reason: String,
    action: String,
    note: Option<String>,
}

#[derive(Clone, Debug)]
struct Sent {
    namespace: String,
    name: String,
    count: i32,
    first: Timestamp,
}

/// Publishes events as one controller instance (`reportingController`, `reportingInstance`).
pub struct Events {
    client: Client,
    controller: String,
    instance: String,
    sent: tokio::sync::Mutex<HashMap<Key, Sent>>,
}

impl Events {
    /// Events reported by `controller` (diskchain) on `instance` (the node).
    pub fn new(client: Client, controller: &str, instance: &str) -> Events {
        Events {
            client,
            controller: controller.to_string(),
            instance: instance.to_string(),
            sent: Default::default(),
        }
    }

    /// Publishes `ev` about `regarding`: a new Event, or the count of the same event sent
    /// within [`REPEAT_WITHIN`] raised.
    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let key = Key {
            regarding: (
                regarding.uid.clone(),
                regarding.namespace.clone(),
                regarding.name.clone(),
            ),
            warning: matches!(ev.type_, EventType::Warning),
            reason: ev.reason.clone(),
            action: ev.action.clone(),
            note: ev.note.clone(),
        };
        let window = SignedDuration::try_from(REPEAT_WITHIN).unwrap_or(SignedDuration::ZERO);
        let mut sent = self.sent.lock().await;
        sent.retain(|_, s| s.first + window > now);
        if let Some(s) = sent.get_mut(&key) {
            let count = s.count + 1;
            let patch = serde_json::json!({
                "series": EventSeries { count, last_observed_time: MicroTime(now) },
            });
            let (ns, name) = (s.namespace.clone(), s.name.clone());
            match Api::<K8sEvent>::namespaced(self.client.clone(), &ns)
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    s.count = count;
                    return Ok(());
                }
                // Gone already (the API server's event TTL): a new one.
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    sent.remove(&key);
                }
                Err(e) => return Err(e),
            }
        }
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or(&self.controller),
            now.as_nanosecond()
        );
        let event = K8sEvent {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            reason: Some(ev.reason.clone()),
            action: Some(ev.action.clone()),
            note: ev.note.as_ref().map(|n| truncate(n, 1024)),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        api.create(&PostParams::default(), &event).await?;
        sent.insert(
            key,
            Sent {
                namespace,
                name,
                count: 1,
                first: now,
            },
        );
        Ok(())
    }
}

/// `note` cut to at most `max` bytes on a character boundary (the API server refuses longer
/// notes), with an ellipsis when cut.
fn truncate(note: &str, max: usize) -> String {
    if note.len() <= max {
        return note.to_string();
    }
    let mut end = max - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn long_notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("short", 1024), "short");
        let long = "é".repeat(600);
        let cut = truncate(&long, 1024);
        assert!(cut.len() <= 1024, "{}", cut.len());
        assert!(cut.ends_with("..."));
    }
}
