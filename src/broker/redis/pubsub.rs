//! The subscription manager: the one pub/sub connection of an instance, its reconnects,
//! and the catch-up after an outage.
//!
//! [`RedisBroker::run_pubsub`] owns the connection for the life of the process and applies
//! [`SubCommand`]s in the order they were sent. What it reads is checked, framed once and
//! handed to the sink one read's batch per project at a time. After an outage it asks the
//! sink to recover while it keeps reading live messages into a bounded hold ([`Held`]),
//! delivered after the recovery in arrival order; it keeps answering subscription requests
//! throughout, so nobody waits on a dead connection.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use deadpool_redis::redis;
use futures_util::FutureExt;
use tokio::sync::mpsc;

use super::RedisBroker;
use crate::broker::{channel_project, commands_channel_project, Broker, SubCommand};

/// Largest story progress message relayed (seed 003's are a few hundred bytes).
const STORY_MAX_BYTES: usize = 64 * 1024;

/// Most pub/sub messages handled as one batch.
const MAX_READ_BATCH: usize = 512;

impl RedisBroker {
    /// Logs a dropped event at most once per reason per minute; always counts it.
    fn note_dropped(&self, channel: &str, reason: &'static str, detail: &str) {
        self.stats.dropped_events.fetch_add(1, Ordering::Relaxed);
        self.metrics.rejected(reason);
        let mut log = self.drop_log.lock();
        let now = Instant::now();
        match log.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, last)) if now.duration_since(*last) < Duration::from_secs(60) => return,
            Some((_, last)) => *last = now,
            None => log.push((reason, now)),
        }
        drop(log);
        tracing::warn!(
            channel,
            reason,
            detail,
            "dropped an invalid event from Redis (logged once a minute per reason)"
        );
    }

    /// Handles the messages of one read from the pub/sub connection, read at `read_at`.
    /// Consecutive events of a project are checked one by one and fanned out together (one
    /// write per session); each run's fan-out time is observed once, for all its events.
    fn on_messages(&self, msgs: &[redis::Msg], read_at: Instant) {
        let metrics = &self.metrics;
        let Some(sink) = self.sink.get() else { return };
        // `source="redis"` counts what only pub/sub brought: raw publishes (and broadcasts).
        // An event with a seq came through a publish path, which counted it where it came
        // in (`source="api"` for ours); counting its pub/sub copy too counted it twice.
        let mut raw = 0u64;
        let received = SystemTime::now();
        let fan_out = |project: &str, run: &[crate::event::Prepared]| {
            sink.deliver(project, run);
            metrics
                .fanout
                .observe_n(read_at.elapsed(), run.len() as u64);
        };
        let mut run: Vec<crate::event::Prepared> = Vec::new();
        let mut run_project: Option<&str> = None;
        let policy = self.policy;
        for msg in msgs {
            let channel = msg.get_channel_name();
            let payload = msg.get_payload_bytes();
            let project = channel_project(channel);
            if run_project.is_some() && project != run_project {
                if let Some(p) = run_project {
                    fan_out(p, &run);
                }
                run.clear();
                run_project = None;
            }
            if channel == self.broadcast_channel {
                raw += 1;
                match sink.broadcast(payload) {
                    Ok(_) => metrics.fanout.observe(read_at.elapsed()),
                    Err(e) => self.note_dropped(channel, e.reason(), &e.to_string()),
                }
                continue;
            }
            if let Some(project) = commands_channel_project(channel) {
                // A command for the workers on this instance's command streams (this
                // instance subscribes only while it has some): passed on as published.
                sink.deliver_command(project, payload);
                continue;
            }
            if let Some(story) = crate::story::channel_story(channel) {
                raw += 1;
                match crate::story::check(payload, STORY_MAX_BYTES, policy.max_json_depth) {
                    Ok(p) => {
                        sink.deliver_story(story, &p.frame);
                        metrics.fanout.observe(read_at.elapsed());
                        self.queue_story(
                            story,
                            bytes::Bytes::copy_from_slice(payload),
                            p.updated_at,
                        );
                    }
                    Err(e) => self.note_dropped(channel, e.reason(), &e.to_string()),
                }
                continue;
            }
            let Some(project) = project else { continue };
            match crate::event::prepare_received(project, payload, Some(&policy)) {
                Ok((p, published)) => {
                    raw += u64::from(p.seq.is_none());
                    if let Some(at) = published {
                        // A timestamp ahead of our clock (skew) counts as no lag.
                        let lag = received.duration_since(at).unwrap_or(Duration::ZERO);
                        self.stats.pubsub_lag.observe(lag);
                    }
                    run_project = Some(project);
                    run.push(p);
                }
                Err(e) => {
                    raw += 1;
                    self.note_dropped(channel, e.reason(), &e.to_string());
                }
            }
        }
        if let Some(p) = run_project {
            fan_out(p, &run);
        }
        metrics.events_from_redis.fetch_add(raw, Ordering::Relaxed);
    }

    /// The subscription manager: owns the pub/sub connection for the life of the process.
    pub async fn run_pubsub(self: Arc<Self>, mut commands: mpsc::Receiver<SubCommand>) {
        // What the sink reads history through while it catches up after an outage.
        let broker = Broker::Redis(self.clone());
        let mut wanted: HashSet<String> = HashSet::from([self.broadcast_channel.clone()]);
        let mut backoff =
            next_backoff(BACKOFF_BASE, BACKOFF_BASE, self.max_backoff, rand::random());
        let mut down_since: Option<Instant> = None;
        loop {
            match self
                .connect_and_serve(&broker, &mut wanted, &mut commands, &mut down_since)
                .await
            {
                Serve::Stop => return,
                Serve::Lost(reason) => {
                    if self.up.swap(false, Ordering::Relaxed) {
                        // It was serving: start the next attempt from the shortest backoff.
                        backoff = next_backoff(
                            BACKOFF_BASE,
                            BACKOFF_BASE,
                            self.max_backoff,
                            rand::random(),
                        );
                        down_since = Some(Instant::now());
                        tracing::error!(%reason, "broker connection lost; clients stay connected, reconnecting");
                    } else {
                        tracing::debug!(%reason, "broker still unreachable");
                    }
                }
            }
            // Back off, still answering the hub so nobody waits on a dead connection.
            let wake = tokio::time::sleep(backoff);
            tokio::pin!(wake);
            loop {
                tokio::select! {
                    _ = &mut wake => break,
                    cmd = commands.recv() => match cmd {
                        None => return,
                        Some(SubCommand::Subscribe { channel, done }) => {
                            wanted.insert(channel);
                            let _ = done.send(false);
                        }
                        Some(SubCommand::Unsubscribe { channel }) => {
                            wanted.remove(&channel);
                        }
                    },
                }
            }
            backoff = next_backoff(backoff, BACKOFF_BASE, self.max_backoff, rand::random());
        }
    }

    /// After an outage: the sink brings every project back in step (replay from history,
    /// or a resync where the history no longer covers the gap).
    fn catch_up<'a>(&'a self, broker: &'a Broker) -> CatchUp<'a> {
        match self.sink.get() {
            Some(sink) => sink.recover(broker),
            None => Box::pin(async {}),
        }
    }

    async fn connect_and_serve<'a>(
        &'a self,
        broker: &'a Broker,
        wanted: &mut HashSet<String>,
        commands: &mut mpsc::Receiver<SubCommand>,
        down_since: &mut Option<Instant>,
    ) -> Serve {
        let (mut link, mut stream) =
            match tokio::time::timeout(self.timeout, self.open_link(wanted)).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => return Serve::Lost(e.to_string()),
                Err(_) => return Serve::Lost("connect timed out".into()),
            };
        // After an outage, every connected client first gets what it missed (catch-up from
        // history), and only then live messages. The catch-up runs inside this loop, so the
        // pub/sub stream is still read meanwhile (into `held`, bounded in bytes: the
        // client library's own queue is unbounded) and subscriptions are still answered.
        // `down_since` is cleared only once a catch-up completed, so a connection lost
        // during one leads to another.
        let since = *down_since;
        let mut catch_up: Option<CatchUp<'a>> = since.map(|_| self.catch_up(broker));
        let mut held = Held::default();
        let mut rounds = 1;
        if since.is_none() {
            tracing::info!(channels = wanted.len(), "broker pub/sub connected");
            self.up.store(true, Ordering::Relaxed);
        }
        let mut ping = tokio::time::interval(self.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                biased;
                _ = async {
                    match catch_up.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if catch_up.is_some() => {
                    if held.overflowed {
                        // Live messages were dropped while catching up; those with a seq
                        // are in the history, so one more round from where we got to
                        // delivers them (messages without one cannot be replayed).
                        if rounds >= CATCH_UP_ROUNDS {
                            return Serve::Lost("catch-up cannot keep up with the live stream".into());
                        }
                        rounds += 1;
                        held = Held::default();
                        catch_up = Some(self.catch_up(broker));
                        continue;
                    }
                    catch_up = None;
                    let backlog = std::mem::take(&mut held.msgs);
                    if !backlog.is_empty() {
                        self.on_messages(&backlog, Instant::now());
                        self.sink.settled().await;
                    }
                    *down_since = None;
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        outage_ms = since.map_or(0, |s| s.elapsed().as_millis() as u64),
                        channels = wanted.len(),
                        rounds,
                        "broker reconnected and resubscribed"
                    );
                    self.up.store(true, Ordering::Relaxed);
                }
                msg = stream.next() => match msg {
                    Some(Err(lost)) => return Serve::Lost(lost),
                    Some(Ok(msg)) if catch_up.is_some() => held.push(msg),
                    Some(Ok(msg)) => {
                        let read_at = Instant::now();
                        // Take everything already received: under load, batches grow and
                        // each session gets fewer, larger writes.
                        let mut batch = vec![msg];
                        while batch.len() < MAX_READ_BATCH {
                            match stream.next().now_or_never() {
                                Some(Some(Ok(m))) => batch.push(m),
                                Some(Some(Err(lost))) => {
                                    self.on_messages(&batch, read_at);
                                    return Serve::Lost(lost);
                                }
                                Some(None) => {
                                    self.on_messages(&batch, read_at);
                                    return Serve::Lost("pub/sub connection closed".into());
                                }
                                None => break,
                            }
                        }
                        self.on_messages(&batch, read_at);
                        // Bounded hand-off to the fan-out shards: no more reads while
                        // they are past their bounds (Redis buffers meanwhile).
                        self.sink.settled().await;
                    }
                    None => return Serve::Lost("pub/sub connection closed".into()),
                },
                cmd = commands.recv() => match cmd {
                    None => return Serve::Stop,
                    Some(SubCommand::Subscribe { channel, done }) => {
                        let fresh = wanted.insert(channel.clone());
                        if !fresh {
                            let _ = done.send(true);
                            continue;
                        }
                        match tokio::time::timeout(self.timeout, link.subscribe(&channel)).await {
                            Ok(Ok(())) => { let _ = done.send(true); }
                            Ok(Err(e)) => { let _ = done.send(false); return Serve::Lost(e.to_string()); }
                            Err(_) => { let _ = done.send(false); return Serve::Lost("SUBSCRIBE timed out".into()); }
                        }
                    }
                    Some(SubCommand::Unsubscribe { channel }) => {
                        if wanted.remove(&channel) {
                            match tokio::time::timeout(self.timeout, link.unsubscribe(&channel)).await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => return Serve::Lost(e.to_string()),
                                Err(_) => return Serve::Lost("UNSUBSCRIBE timed out".into()),
                            }
                        }
                    }
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(self.timeout, link.ping(self)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Serve::Lost(format!("PING failed: {e}")),
                        Err(_) => {
                            self.stats.dead_pubsub_detected.fetch_add(1, Ordering::Relaxed);
                            return Serve::Lost("pub/sub connection silently dead (PING unanswered)".into());
                        }
                    }
                }
            }
        }
    }
}

enum Serve {
    Stop,
    Lost(String),
}

/// A catch-up in progress (see `connect_and_serve`).
type CatchUp<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Live pub/sub bytes held while a catch-up runs. Past it, held messages are dropped and
/// the catch-up goes one more round (events with a seq are in the history).
const CATCH_UP_HOLD_BYTES: usize = 32 * 1024 * 1024;

/// Catch-up rounds before giving up on this connection (and reconnecting).
const CATCH_UP_ROUNDS: u32 = 4;

/// Live messages received during a catch-up, delivered after it in arrival order.
#[derive(Default)]
struct Held {
    msgs: Vec<redis::Msg>,
    bytes: usize,
    overflowed: bool,
}

impl Held {
    fn push(&mut self, msg: redis::Msg) {
        if self.overflowed {
            return;
        }
        let size = msg.get_payload_bytes().len() + msg.get_channel_name().len() + 64;
        if self.bytes + size > CATCH_UP_HOLD_BYTES {
            self.overflowed = true;
            self.msgs = Vec::new();
            self.bytes = 0;
            return;
        }
        self.bytes += size;
        self.msgs.push(msg);
    }
}

/// Shortest wait before a reconnect attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// The wait after `prev`: decorrelated jitter, uniform in `[base, 3 × prev]` and capped at
/// `cap` (`unit` is a uniform random number in `[0, 1)`). It grows about threefold per
/// attempt like an exponential backoff, but every instance draws its own: a fleet that lost
/// Redis at the same moment spreads its reconnects instead of arriving in lockstep.
pub(crate) fn next_backoff(prev: Duration, base: Duration, cap: Duration, unit: f64) -> Duration {
    let low = base.min(cap).as_secs_f64();
    let high = (prev.as_secs_f64() * 3.0).max(low);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    Duration::from_secs_f64(low + (high - low) * unit).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_bounded_and_grows() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        // Bounds: [base, 3 × prev], capped.
        assert_eq!(next_backoff(base, base, cap, 0.0), base);
        assert_eq!(next_backoff(base, base, cap, 0.999_999).as_millis(), 299);
        assert_eq!(next_backoff(Duration::from_secs(4), base, cap, 0.9), cap);
        assert_eq!(next_backoff(base, base, cap, f64::NAN), base);
        // Jitter: different draws give different waits (lockstep is what this prevents).
        let a = next_backoff(Duration::from_secs(1), base, cap, 0.1);
        let b = next_backoff(Duration::from_secs(1), base, cap, 0.7);
        assert_ne!(a, b);
        // A run of real random draws stays in bounds and never exceeds the cap.
        let mut prev = base;
        let mut longest = Duration::ZERO;
        for _ in 0..200 {
            let next = next_backoff(prev, base, cap, rand::random());
            assert!(
                next >= base && next <= cap && next <= prev * 3,
                "{prev:?} -> {next:?}"
            );
            longest = longest.max(next);
            prev = next;
        }
        assert!(longest >= cap / 2, "never grew: {longest:?}");
        // 200 draws with identical waits would mean no jitter at all.
        let draws: HashSet<u128> = (0..200)
            .map(|_| next_backoff(Duration::from_secs(1), base, cap, rand::random()).as_micros())
            .collect();
        assert!(draws.len() > 150);
    }
}
