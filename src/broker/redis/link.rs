//! The pub/sub link of an instance, whatever the topology: one pub/sub connection to the
//! server (single, or Sentinel's master as named at connect time), or a Redis Cluster
//! connection in RESP3 that receives its pushes from every node.
//!
//! The subscription manager (`pubsub.rs`) speaks in the hub's channel names; on a cluster
//! a project's events are followed on both the seed's classic channel (legacy workers'
//! plain `PUBLISH`, which a cluster relays to every node) and the sharded one the publish
//! script `SPUBLISH`es (only the slot's shard carries it), and a project's commands on the
//! sharded channel only (the command script publishes both; following both would hand
//! each command over twice). Invariant: a node connection the cluster client loses ends
//! the link (`Err` from [`Stream::next`]): what that node's shards carried meanwhile was
//! not received, so the manager reconnects and catches up from history, as after any
//! outage.

use deadpool_redis::redis::{
    self, aio::ConnectionLike, cluster::ClusterClientBuilder, cluster_async::ClusterConnection,
    Msg, ProtocolVersion, PushInfo, PushKind, RedisResult,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc::UnboundedReceiver;

use super::topology::Keys;
use super::RedisBroker;
use crate::broker::{channel_project, commands_channel_project};

pub(super) enum Link {
    Single(redis::aio::PubSubSink),
    Cluster(ClusterConnection, OwnUnsubscribes),
}

pub(super) enum Stream {
    Single(redis::aio::PubSubStream),
    Cluster(UnboundedReceiver<PushInfo>, OwnUnsubscribes),
}

/// The sharded channels this link itself unsubscribed lately, so the stream can tell their
/// `sunsubscribe` confirmations from the server's own: Redis unsubscribes a shard channel's
/// subscribers when its slot moves to another shard (resharding, a failover), and the
/// cluster client does not follow it there. Bounded: entries older than
/// [`OWN_UNSUBSCRIBE_TTL`] are dropped, and past [`OWN_UNSUBSCRIBE_MAX`] channels the oldest
/// go first (a client churning through projects cannot grow it).
#[derive(Clone, Default)]
pub(super) struct OwnUnsubscribes(Arc<Mutex<HashMap<Vec<u8>, Instant>>>);

const OWN_UNSUBSCRIBE_TTL: Duration = Duration::from_secs(30);
const OWN_UNSUBSCRIBE_MAX: usize = 16_384;

impl OwnUnsubscribes {
    fn note(&self, channel: &str) {
        let mut own = self.0.lock();
        if own.len() >= OWN_UNSUBSCRIBE_MAX {
            own.retain(|_, at| at.elapsed() < OWN_UNSUBSCRIBE_TTL);
            while own.len() >= OWN_UNSUBSCRIBE_MAX {
                let Some(oldest) = own
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(c, _)| c.clone())
                else {
                    break;
                };
                own.remove(&oldest);
            }
        }
        own.insert(channel.as_bytes().to_vec(), Instant::now());
    }

    /// Whether `channel`'s unsubscription was ours, lately (and forgets it).
    fn take(&self, channel: &[u8]) -> bool {
        self.0
            .lock()
            .remove(channel)
            .is_some_and(|at| at.elapsed() < OWN_UNSUBSCRIBE_TTL)
    }

    fn forget(&self, channel: &str) {
        self.0.lock().remove(channel.as_bytes());
    }
}

/// What a hub channel is followed as on a cluster: (classic, sharded).
fn cluster_channels(channel: &str) -> (Option<String>, Option<String>) {
    let tagged = Keys { tagged: true };
    if let Some(project) = channel_project(channel) {
        (
            Some(channel.to_owned()),
            Some(tagged.project(project, "events")),
        )
    } else if let Some(project) = commands_channel_project(channel) {
        (None, Some(tagged.project(project, "commands")))
    } else {
        (Some(channel.to_owned()), None)
    }
}

impl Link {
    pub(super) async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Link::Single(sink) => sink.subscribe(channel).await,
            Link::Cluster(conn, own) => {
                let (classic, sharded) = cluster_channels(channel);
                if let Some(c) = classic {
                    conn.subscribe(c).await?;
                }
                if let Some(s) = sharded {
                    own.forget(&s);
                    conn.ssubscribe(s).await?;
                }
                Ok(())
            }
        }
    }

    pub(super) async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Link::Single(sink) => sink.unsubscribe(channel).await,
            Link::Cluster(conn, own) => {
                let (classic, sharded) = cluster_channels(channel);
                if let Some(c) = classic {
                    conn.unsubscribe(c).await?;
                }
                if let Some(s) = sharded {
                    own.note(&s);
                    conn.sunsubscribe(s).await?;
                }
                Ok(())
            }
        }
    }

    /// PING (a silently dead connection does not answer). On a cluster, `CLUSTER NODES`
    /// instead: it answers the same way and tells the masters for `/health/websocket`.
    pub(super) async fn ping(&mut self, broker: &RedisBroker) -> RedisResult<()> {
        match self {
            Link::Single(sink) => sink.ping::<redis::Value>().await.map(drop),
            Link::Cluster(conn, _) => {
                let mut cmd = redis::cmd("CLUSTER");
                cmd.arg("NODES");
                let text: String = redis::from_redis_value(conn.req_packed_command(&cmd).await?)
                    .map_err(redis::RedisError::from)?;
                broker.backend.note_cluster_nodes(&text);
                Ok(())
            }
        }
    }
}

impl Stream {
    /// The next message; `Err` when a node connection was lost or a shard channel moved
    /// (cluster), None when the connection closed.
    pub(super) async fn next(&mut self) -> Option<Result<Msg, String>> {
        match self {
            Stream::Single(s) => futures_util::StreamExt::next(s).await.map(Ok),
            Stream::Cluster(rx, own) => loop {
                let push = rx.recv().await?;
                if push.kind == PushKind::Disconnection {
                    return Some(Err("a cluster node connection was lost".into()));
                }
                if push.kind == PushKind::SUnsubscribe {
                    let channel = match push.data.first() {
                        Some(redis::Value::BulkString(c)) => c.clone(),
                        _ => Vec::new(),
                    };
                    if !own.take(&channel) {
                        return Some(Err(format!(
                            "shard channel {} moved to another shard",
                            String::from_utf8_lossy(&channel)
                        )));
                    }
                    continue;
                }
                // Subscription confirmations and other pushes carry no message.
                if let Some(msg) = Msg::from_push_info(push) {
                    return Some(Ok(msg));
                }
            },
        }
    }
}

/// Subscriptions sent at once when a cluster link (re)connects.
const SUBSCRIBE_CONCURRENCY: usize = 256;

impl RedisBroker {
    /// Connects the pub/sub link and subscribes `wanted` (Sentinel: to the master the
    /// sentinels name now).
    pub(super) async fn open_link(
        &self,
        wanted: &std::collections::HashSet<String>,
    ) -> RedisResult<(Link, Stream)> {
        if let Some(urls) = self.backend.cluster_urls() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let client = ClusterClientBuilder::new(urls.to_vec())
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(tx)
                .connection_timeout(self.timeout)
                .response_timeout(self.timeout)
                .build()?;
            let own = OwnUnsubscribes::default();
            let conn = client.get_async_connection().await?;
            let mut link = Link::Cluster(conn.clone(), own.clone());
            link.ping(self).await?;
            // Every channel again after a reconnect, many at a time (clones share the node
            // connections): one by one, a few thousand projects would outlast the connect
            // timeout and the link would never come back.
            let channels: Vec<String> = wanted.iter().cloned().collect();
            for chunk in channels.chunks(SUBSCRIBE_CONCURRENCY) {
                let sent = chunk.iter().map(|channel| {
                    let mut one = Link::Cluster(conn.clone(), own.clone());
                    let channel = channel.clone();
                    async move { one.subscribe(&channel).await }
                });
                futures_util::future::try_join_all(sent).await?;
            }
            return Ok((link, Stream::Cluster(rx, own)));
        }
        let url = self
            .backend
            .pubsub_url()
            .await
            .map_err(|e| redis::RedisError::from(std::io::Error::other(e.to_string())))?;
        let (mut sink, stream) = redis::Client::open(url)?.get_async_pubsub().await?.split();
        let channels: Vec<&String> = wanted.iter().collect();
        sink.subscribe(channels).await?;
        Ok((Link::Single(sink), Stream::Single(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_unsubscribes_are_told_apart_and_bounded() {
        let own = OwnUnsubscribes::default();
        own.note("project:{a}:events");
        assert!(own.take(b"project:{a}:events"), "ours");
        assert!(
            !own.take(b"project:{a}:events"),
            "taken once: the next is the server's"
        );
        own.note("project:{b}:events");
        own.forget("project:{b}:events");
        assert!(
            !own.take(b"project:{b}:events"),
            "subscribed again: not ours any more"
        );
        for i in 0..OWN_UNSUBSCRIBE_MAX + 100 {
            own.note(&format!("project:{{p{i}}}:events"));
        }
        assert!(own.0.lock().len() <= OWN_UNSUBSCRIBE_MAX);
        assert!(own.take(format!("project:{{p{}}}:events", OWN_UNSUBSCRIBE_MAX + 99).as_bytes()));
    }

    #[test]
    fn cluster_follows_events_on_both_channels_and_commands_on_the_sharded_one() {
        assert_eq!(
            cluster_channels("project:p:events"),
            (
                Some("project:p:events".into()),
                Some("project:{p}:events".into())
            )
        );
        assert_eq!(
            cluster_channels("project:p:commands"),
            (None, Some("project:{p}:commands".into()))
        );
        assert_eq!(cluster_channels("story:s"), (Some("story:s".into()), None));
        assert_eq!(
            cluster_channels("websocket:broadcast"),
            (Some("websocket:broadcast".into()), None)
        );
    }
}
