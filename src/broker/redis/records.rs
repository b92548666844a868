//! Connection records (`ws:connection:{id}`), project presence and the instance registry:
//! queued by handshakes and disconnects, written in batches by one writer task (one
//! pipeline per batch instead of a round trip per connection, for connect storms), in order
//! with their deletions. Every write is bounded by the command timeout; a record that
//! cannot be written is skipped (the heartbeat's refresh writes it again, and a skipped
//! delete expires with its TTL).

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::{self, AsyncCommands};
use tokio::sync::mpsc;

use super::topology::Keys;
use super::RedisBroker;
use crate::broker::{connection_key, instance_key, BrokerError, ConnectionRecord, LiveCount};

/// A queued change to the connection records (or a story's stored progress).
#[derive(Debug)]
pub enum RecordOp {
    /// A raw PUBLISH on `story:{id}` was relayed: keep it as the story's latest unless
    /// the stored one is newer (`updated_at`).
    StoryProgress {
        story: String,
        payload: bytes::Bytes,
        updated_at: Option<String>,
    },
    Put(ConnectionRecord, Duration),
    Delete(String, Vec<String>),
    /// This instance's command streams of a project, counted when written.
    CommandStreams {
        project: String,
        instance_id: String,
        count: LiveCount,
        ttl: Duration,
    },
    /// Answered once everything queued before it is written (the drain's last step).
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl RedisBroker {
    /// Queues a connection record write; records are written in batches, in order with
    /// their deletions, by [`RedisBroker::run_records`] (one pipeline per batch instead of
    /// a round trip per connection: connect storms).
    pub async fn put_connection(&self, record: &ConnectionRecord, ttl: Duration) {
        self.record_op(RecordOp::Put(record.clone(), ttl)).await;
    }

    pub async fn note_command_streams(
        &self,
        project: &str,
        instance_id: &str,
        count: LiveCount,
        ttl: Duration,
    ) {
        self.record_op(RecordOp::CommandStreams {
            project: project.to_owned(),
            instance_id: instance_id.to_owned(),
            count,
            ttl,
        })
        .await;
    }

    pub async fn delete_connection(&self, client_id: &str, projects: &[String]) {
        self.record_op(RecordOp::Delete(client_id.to_owned(), projects.to_vec()))
            .await;
    }

    /// Queues a record write. Bounded in time as well as size: when the writer is stuck
    /// behind an unreachable Redis, the handshake that queues a put must not hang (the
    /// record is skipped; the heartbeat's refresh writes it again, and a skipped delete
    /// expires with its TTL).
    async fn record_op(&self, op: RecordOp) {
        match tokio::time::timeout(self.timeout, self.records.send(op)).await {
            Ok(Ok(())) => {}
            // The writer is gone (shutting down): write this one directly.
            Ok(Err(e)) => self.write_records(vec![e.0]).await,
            Err(_) => tracing::debug!("connection record queue stuck: record skipped"),
        }
    }

    /// The record writer: drains queued puts/deletes and writes each batch as one pipeline.
    pub async fn run_records(self: Arc<Self>, mut ops: mpsc::Receiver<RecordOp>) {
        while let Some(op) = ops.recv().await {
            let mut batch = vec![op];
            while batch.len() < 1000 {
                match ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let (flushes, batch): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .partition(|op| matches!(op, RecordOp::Flush(_)));
            if !batch.is_empty() {
                self.write_records(batch).await;
            }
            for op in flushes {
                if let RecordOp::Flush(done) = op {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Waits until the record writer has written everything queued so far (bounded by the
    /// command timeout): a clean shutdown leaves no connection record behind.
    pub async fn flush_records(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        let flushed = async {
            if self.records.send(RecordOp::Flush(done)).await.is_ok() {
                let _ = written.await;
            }
        };
        if tokio::time::timeout(self.timeout, flushed).await.is_err() {
            tracing::warn!("connection records not all written before exit (Redis slow)");
        }
    }

    /// Queues the store of a relayed story progress without waiting: called from the
    /// pub/sub loop, which must never block (a full queue skips it; the next message
    /// stores again, and a publisher using the API stores atomically anyway).
    pub(super) fn queue_story(
        &self,
        story: &str,
        payload: bytes::Bytes,
        updated_at: Option<String>,
    ) {
        let op = RecordOp::StoryProgress {
            story: story.to_owned(),
            payload,
            updated_at,
        };
        if self.records.try_send(op).is_err() {
            tracing::debug!(story, "record queue full: relayed progress not stored");
        }
    }

    async fn write_records(&self, batch: Vec<RecordOp>) {
        let mut pipe = redis::pipe();
        let now = crate::event::unix_millis();
        let mut stories = Vec::new();
        let mut records = 0;
        for op in &batch {
            match op {
                RecordOp::StoryProgress {
                    story,
                    payload,
                    updated_at,
                } => stories.push((story, payload, updated_at)),
                RecordOp::Put(record, ttl) => {
                    records += 1;
                    let secs = ttl.as_secs().max(1);
                    let value = serde_json::to_string(record).unwrap_or_default();
                    pipe.set_ex(connection_key(&record.client_id), value, secs)
                        .ignore();
                    for project in &record.projects {
                        pipe.zadd(
                            self.keys.project(project, "presence"),
                            &record.client_id,
                            now + secs * 1000,
                        )
                        .ignore();
                        pipe.expire(self.keys.project(project, "presence"), secs as i64 * 2)
                            .ignore();
                    }
                }
                RecordOp::Delete(client_id, projects) => {
                    records += 1;
                    pipe.del(connection_key(client_id)).ignore();
                    for project in projects {
                        pipe.zrem(self.keys.project(project, "presence"), client_id)
                            .ignore();
                    }
                }
                RecordOp::CommandStreams {
                    project,
                    instance_id,
                    count,
                    ttl,
                } => {
                    records += 1;
                    put_command_streams(
                        self.keys,
                        &mut pipe,
                        project,
                        instance_id,
                        (count.0)(),
                        *ttl,
                    );
                }
                // Taken out of every batch by `run_records`.
                RecordOp::Flush(_) => {}
            }
        }
        if records > 0 {
            if let Err(e) = self.run_pipeline(pipe).await {
                tracing::warn!(error = %e, ops = records, "could not write connection records");
            }
        }
        for (story, payload, updated_at) in stories {
            let updated = updated_at.as_deref().unwrap_or("");
            if let Err(e) = self
                .story_script(story, payload.to_vec(), "relay", updated)
                .await
            {
                tracing::warn!(error = %e, story, "could not store relayed story progress");
            }
        }
    }

    pub async fn presence_update(&self, project: &str, client_id: &str, ttl: Option<Duration>) {
        let key = self.keys.project(project, "presence");
        let client_id = client_id.to_owned();
        let result = self
            .with_conn(|mut conn| async move {
                match ttl {
                    Some(ttl) => {
                        let until = crate::event::unix_millis() + ttl.as_millis() as u64;
                        conn.zadd::<_, _, _, ()>(key, client_id, until).await
                    }
                    None => conn.zrem::<_, _, ()>(key, client_id).await,
                }
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, project, "could not update presence");
        }
    }

    pub async fn refresh_instance(
        &self,
        instance_id: &str,
        info: &serde_json::Value,
        connections: &[(String, Vec<String>)],
        command_streams: &[(String, usize)],
        ttl: Duration,
    ) {
        let secs = ttl.as_secs().max(1);
        let until = crate::event::unix_millis() + secs * 1000;
        let info = info.to_string();
        let key = instance_key(instance_id);
        // One round trip per chunk of records, whatever the number of connections.
        let mut chunks: Vec<&[(String, Vec<String>)]> = connections.chunks(500).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut pipe = redis::pipe();
            if i == 0 {
                pipe.set_ex(&key, &info, secs).ignore();
                for (project, n) in command_streams {
                    put_command_streams(self.keys, &mut pipe, project, instance_id, *n, ttl);
                }
            }
            for (id, projects) in chunk {
                pipe.expire(connection_key(id), secs as i64).ignore();
                for project in projects {
                    pipe.zadd(self.keys.project(project, "presence"), id, until)
                        .ignore();
                    pipe.expire(self.keys.project(project, "presence"), secs as i64 * 2)
                        .ignore();
                }
            }
            if let Err(e) = self.run_pipeline(pipe).await {
                tracing::warn!(error = %e, "could not refresh instance registry");
                return;
            }
        }
    }

    /// Live connection records of `project` across all instances.
    pub async fn presence(&self, project: &str) -> Result<Vec<serde_json::Value>, BrokerError> {
        let key = self.keys.project(project, "presence");
        let now = crate::event::unix_millis();
        let (_, ids): ((), Vec<String>) = self
            .with_conn(|mut conn| async move {
                redis::pipe()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now)
                    .ignore()
                    .cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg(now)
                    .arg("+inf")
                    .query_async(&mut conn)
                    .await
                    .map(|(ids,): (Vec<String>,)| ((), ids))
            })
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| connection_key(id)).collect();
        let raw: Vec<Option<String>> = self
            .with_conn(|mut conn| async move {
                redis::cmd("MGET").arg(keys).query_async(&mut conn).await
            })
            .await?;
        Ok(raw
            .into_iter()
            .flatten()
            .filter_map(|r| serde_json::from_str(&r).ok())
            .collect())
    }

    /// Runs a pipeline of independent writes (split per command on a cluster, see
    /// [`super::topology::Conn::exec_independent`]).
    async fn run_pipeline(&self, pipe: redis::Pipeline) -> Result<(), BrokerError> {
        self.with_conn(|conn| conn.exec_independent(pipe)).await
    }

    pub async fn deregister_instance(&self, instance_id: &str) {
        let key = instance_key(instance_id);
        let _ = self
            .with_conn(|mut conn| async move { conn.del::<_, ()>(key).await })
            .await;
    }
}

/// This instance's entry in `project:{id}:command_streams` (removed at 0): `<n>:<until>`,
/// the count and when it stops counting (unix ms, one record TTL past this refresh, like the
/// instance's registry key). The hash lives twice the TTL past its last refresh; an entry of
/// an instance that died without removing it is dropped by the command script once it is
/// past its time (the script checks the entry itself, not the registry key: on a cluster
/// that key is in another slot).
fn put_command_streams(
    keys: Keys,
    pipe: &mut redis::Pipeline,
    project: &str,
    instance_id: &str,
    n: usize,
    ttl: Duration,
) {
    let key = keys.project(project, "command_streams");
    if n > 0 {
        let until = crate::event::unix_millis() + ttl.as_millis() as u64;
        pipe.hset(&key, instance_id, format!("{n}:{until}"))
            .ignore();
        pipe.expire(&key, ttl.as_secs().max(1) as i64 * 2).ignore();
    } else {
        pipe.hdel(&key, instance_id).ignore();
    }
}
