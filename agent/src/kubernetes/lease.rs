//! One agent per node: a `coordination.k8s.io` Lease named after the node. An agent acquires it
//! when nobody holds it or its holder stopped renewing (longer than the lease's duration), and
//! renews it every third of the duration. Writes carry the `resourceVersion` read, so of two
//! agents racing, the API server lets one through and answers the other 409.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// The node's lease, as one agent sees it.
pub struct NodeLease {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl NodeLease {
    /// The lease `diskchain-NODE` in `namespace`, for the agent `identity`.
    pub fn new(
        client: Client,
        namespace: &str,
        node: &str,
        identity: &str,
        duration: Duration,
    ) -> NodeLease {
        NodeLease {
            api: Api::namespaced(client, namespace),
            name: format!("diskchain-{node}"),
            identity: identity.to_string(),
            duration,
        }
    }

    /// How often a holder renews.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// Acquires or renews the lease: `Ok(true)` when this agent holds it now, `Ok(false)`
    /// when another agent does (or won a race).
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let spec = |acquired: Option<MicroTime>, transitions: i32| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let conflict = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 409);
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec(None, 0)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if conflict(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let s = lease.spec.clone().unwrap_or_default();
                let mine = s.holder_identity.as_deref() == Some(self.identity.as_str());
                let duration =
                    SignedDuration::from_secs(i64::from(s.lease_duration_seconds.unwrap_or(0)));
                let expired = s.renew_time.as_ref().is_none_or(|r| r.0 + duration < now);
                let free = s.holder_identity.is_none() || expired;
                if !mine && !free {
                    return Ok(false);
                }
                let transitions = s.lease_transitions.unwrap_or(0) + i32::from(!mine);
                let acquired = if mine { s.acquire_time } else { None };
                lease.spec = Some(spec(acquired, transitions));
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if conflict(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// The agent that holds the lease now, if any.
    pub async fn holder(&self) -> Result<Option<String>, kube::Error> {
        Ok(self
            .api
            .get_opt(&self.name)
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity))
    }
}
