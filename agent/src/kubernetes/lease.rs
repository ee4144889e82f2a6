//! One agent per node: a `coordination.k8s.io` Lease named after the node, held as client-go's
//! leader election holds one.
//!
//! - An agent acquires the lease when nobody holds it, its holder released it, or its holder
//!   stopped renewing for longer than the lease's duration.
//! - The holder renews every third of the duration with one request (a replace carrying the
//!   `resourceVersion` of its last write: of two agents racing, the API server lets one through
//!   and answers the other 409), each bounded by a deadline.
//! - A holder whose last renewal is older than the renew deadline (two thirds of the duration)
//!   is *fenced*: it starts no step and writes nothing to the API until a renewal succeeds, so it
//!   has stopped before any standby can take the lease over. A step already running goes on: the
//!   image's QEMU lock and the disk's lock keep a new holder off its files until it ends.
//! - A fenced holder exits (1) once it learns another agent holds the lease, or when the API
//!   answers other requests but still not its renewals for a whole lease duration. While the
//!   API does not answer at all, it waits: local steps keep running through an outage.
//! - On a clean shutdown the holder releases the lease (no holder, a duration of 1 s), so the
//!   next pod of a rollout takes it at once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// The node's lease, as one agent sees it.
pub struct NodeLease {
    api: Api<Lease>,
    client: Client,
    name: String,
    identity: String,
    duration: Duration,
    /// The lease as this agent last wrote it (its `resourceVersion` makes the next renewal one
    /// request).
    last: Mutex<Option<Lease>>,
    /// When the last successful renewal was sent.
    renewed: Mutex<Option<Instant>>,
    /// Set once this agent knows another one holds the lease.
    lost: AtomicBool,
}

/// What a try to hold the lease found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// This agent holds it (acquired or renewed).
    Held,
    /// Another agent holds it.
    Other(String),
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
            api: Api::namespaced(client.clone(), namespace),
            client,
            name: format!("diskchain-{node}"),
            identity: identity.to_string(),
            duration,
            last: Mutex::new(None),
            renewed: Mutex::new(None),
            lost: AtomicBool::new(false),
        }
    }

    /// How often a holder renews (and a standby looks).
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// How old the last renewal may be before the holder stops writing.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// The lease's duration.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// True while this agent may act: its last renewal is younger than the renew deadline and no
    /// other agent is known to hold the lease.
    pub fn holding(&self) -> bool {
        !self.lost.load(Ordering::SeqCst)
            && self
                .renewed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < self.renew_deadline())
    }

    /// How long ago the last renewal was sent (`None`: never held).
    pub fn since_renewal(&self) -> Option<Duration> {
        self.renewed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }

    /// True once another agent is known to hold the lease.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    fn remember(&self, lease: Lease, sent: Instant) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
        *self.renewed.lock().unwrap_or_else(|p| p.into_inner()) = Some(sent);
    }

    /// Acquires or renews the lease, within `deadline`. A holder renews with one request when
    /// nobody wrote the lease since its last renewal.
    pub async fn try_hold(&self, deadline: Duration) -> Result<Hold, String> {
        match tokio::time::timeout(deadline, self.hold()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {:.1} s", deadline.as_secs_f64())),
        }
    }

    async fn hold(&self) -> Result<Hold, kube::Error> {
        // The fast path: our own last write, renewed. `sent` is when the renewal time written
        // was taken: the lease holds for others until then plus its duration.
        let mine = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(mut lease) = mine {
            let sent = Instant::now();
            let s = lease.spec.clone().unwrap_or_default();
            lease.spec = Some(self.spec(
                Timestamp::now(),
                s.acquire_time,
                s.lease_transitions.unwrap_or(0),
            ));
            // A conflict: written by someone else since; read it.
            if let Some(held) = self.write(&lease, false, sent).await? {
                return Ok(held);
            }
        }
        let found = self.api.get_opt(&self.name).await?;
        let (now, sent) = (Timestamp::now(), Instant::now());
        match found {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                Ok(self
                    .write(&lease, true, sent)
                    .await?
                    .unwrap_or(Hold::Other(String::new())))
            }
            Some(mut lease) => {
                let s = lease.spec.clone().unwrap_or_default();
                let holder = s.holder_identity.clone().unwrap_or_default();
                let mine = holder == self.identity;
                let duration =
                    SignedDuration::from_secs(i64::from(s.lease_duration_seconds.unwrap_or(0)));
                let expired = s.renew_time.as_ref().is_none_or(|r| r.0 + duration < now);
                let free = holder.is_empty() || expired;
                if !mine && !free {
                    if self
                        .renewed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_some()
                    {
                        self.lost.store(true, Ordering::SeqCst);
                    }
                    return Ok(Hold::Other(holder));
                }
                let transitions = s.lease_transitions.unwrap_or(0) + i32::from(!mine);
                let acquired = if mine { s.acquire_time } else { None };
                lease.spec = Some(self.spec(now, acquired, transitions));
                Ok(self
                    .write(&lease, false, sent)
                    .await?
                    .unwrap_or(Hold::Other(String::new())))
            }
        }
    }

    /// Writes `lease` (created, or replaced with the `resourceVersion` it carries), its renewal
    /// time taken at `sent`: `Some(Held)` when the API server let it through, `None` when another
    /// agent wrote the lease first (409).
    async fn write(
        &self,
        lease: &Lease,
        create: bool,
        sent: Instant,
    ) -> Result<Option<Hold>, kube::Error> {
        let pp = PostParams::default();
        let written = if create {
            self.api.create(&pp, lease).await
        } else {
            self.api.replace(&self.name, &pp, lease).await
        };
        match written {
            Ok(l) => {
                self.remember(l, sent);
                Ok(Some(Hold::Held))
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// True when the API server answers a cheap request within `deadline` (the lease's renewals
    /// failing while it does means this agent, not the API, is cut off from the lease).
    pub async fn api_answers(&self, deadline: Duration) -> bool {
        matches!(
            tokio::time::timeout(deadline, self.client.apiserver_version()).await,
            Ok(Ok(_))
        )
    }

    /// Gives the lease up (a clean shutdown): no holder and a duration of 1 s, so the next agent
    /// takes it at once. Only a lease this agent holds is written.
    pub async fn release(&self, deadline: Duration) {
        let mine = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(mut lease) = mine else {
            return;
        };
        if self.lost() {
            return;
        }
        let mut s = lease.spec.clone().unwrap_or_default();
        s.holder_identity = None;
        s.lease_duration_seconds = Some(1);
        s.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(s);
        let r = tokio::time::timeout(
            deadline,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await;
        match r {
            Ok(Ok(_)) => tracing::info!(lease = %self.name, "released this node's lease"),
            Ok(Err(e)) => {
                tracing::warn!(lease = %self.name, error = %e, "cannot release this node's lease; the next agent waits for it to expire")
            }
            Err(_) => {
                tracing::warn!(lease = %self.name, "releasing this node's lease did not answer in time; the next agent waits for it to expire")
            }
        }
        *self.renewed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The agent that holds the lease now, if any.
    pub async fn holder(&self) -> Result<Option<String>, kube::Error> {
        Ok(self
            .api
            .get_opt(&self.name)
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty()))
    }
}
