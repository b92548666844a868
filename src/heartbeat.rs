//! One shared timer for every connection: heartbeats, idle drop, credential expiry, the
//! revoked-session recheck ([`crate::revocation`]), and the TTLs of this instance's Redis
//! records.
//!
//! No connection owns a timer (DESIGN "Small connections"), and no tick walks every
//! connection (issue 13: at 18,000 connections a walk per second, and every connection
//! beating in the same second, held fan-out for over 100 ms). Each connection sits in the
//! hub's timing wheel ([`crate::wheel`]) at the second it is next due; a tick, once per
//! second, takes only that second's entries, handles them in slices of at most `SLICE` with
//! a yield between (fan-out runs in between), and puts each back at its next deadline: the
//! next of its beat, its recheck, its story keepalive, its idle limit, its credential
//! expiry and its longest life. Beats and rechecks are phased: each connection beats once
//! per `WS_HEARTBEAT_INTERVAL` in its own second of the interval (`Session::beat_phase`),
//! and is rechecked once per `auth.session_recheck_secs` likewise, so both cost
//! 1/interval of the connections per second. A beat is `system.heartbeat` plus a
//! WebSocket ping in one write, the frame encoded once per project per tick. Each tick also
//! refreshes, in a task of its own, `ws:instance:{id}` and the `ws:connection:*` records
//! (with their presence entries) of the connections whose beat it was, in pipelined round
//! trips: Redis, which also carries the pub/sub traffic, gets the refresh spread too.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use crate::app::App;
use crate::event::unix_millis;
use crate::revocation::SessionRecheck;
use crate::schema::types::SystemHeartbeat;
use crate::session::{Scope, Session};
use crate::wheel::Slice;
use crate::ws::close_code;
use crate::ws::frame;

const SWEEP: Duration = Duration::from_secs(1);

/// Longest run of a tick between two yields: fan-out runs in between, so no tick holds the
/// thread for long whatever falls due at once (a connect storm of 100k in one second is
/// due together a second later).
const SLICE: Duration = Duration::from_micros(200);

/// The smallest second after `since` that is `phase` modulo `every`.
fn next_phased(since: u64, every: u64, phase: u64) -> u64 {
    let from = since + 1;
    from + (phase + every - from % every) % every
}

/// What one tick collects while it visits the due connections.
struct Tick {
    now_ms: u64,
    now: u64,
    ping: Bytes,
    story_ping: Bytes,
    /// `system.heartbeat` + ping, encoded once per project (or per connection scope).
    frames: HashMap<String, Bytes>,
    /// Records whose TTL refresh is due (the connections whose beat it is).
    records: Vec<(String, Vec<String>)>,
    /// Connections whose session recheck is due.
    recheck: Vec<Arc<Session>>,
    /// Main entries to put back: (session, next second, now).
    again: Vec<(Weak<Session>, u64, u64)>,
}

/// The timer's settings, from the config.
struct Plan {
    interval: u64,
    idle_ms: u64,
    keepalive: u64,
    max_age_ms: u64,
    /// Seconds between rechecks of one session-authenticated connection (None: off).
    recheck: Option<u64>,
}

impl Plan {
    /// Handles one connection's entry. `since`: the second its main entry was last
    /// handled at (None for a one-shot check, which only closes what is due and is never
    /// put back). Returns the next second it is due at, None when it is done with.
    fn visit(&self, session: &Arc<Session>, since: Option<u64>, tick: &mut Tick) -> Option<u64> {
        let (now, now_ms) = (tick.now, tick.now_ms);
        if session.outbox.is_closing() || session.is_ended() {
            return None;
        }
        if session.expires_at().is_some_and(|at| at <= now) {
            session.close(close_code::EXPIRED, "credential expired", false);
            return None;
        }
        if self.max_age_ms > 0 && session.age(now_ms).as_millis() as u64 >= self.max_age_ms {
            // The seed's WS_CONNECTION_TIMEOUT: a connection's longest life. 1001:
            // clients reconnect (and resume) as after any going-away.
            session.close(close_code::GOING_AWAY, "connection timeout", false);
            return None;
        }
        let idle = session.idle_for(now_ms).as_millis() as u64;
        if idle >= self.idle_ms {
            // From the timer's task, in the connection's span; client_id is repeated for
            // filters that leave the span out.
            session.span().in_scope(|| {
                tracing::info!(client_id = %session.client_id, "idle timeout: dropping connection");
            });
            session.close(close_code::GOING_AWAY, "idle timeout", true);
            return None;
        }
        let since = since?;
        if session.is_held() {
            // Its greeting is being prepared: nothing goes out before it; look again soon.
            return Some(now + 1);
        }
        let beat_phase = session.beat_phase(self.interval);
        let beat = next_phased(since, self.interval, beat_phase) <= now;
        let mut next = next_phased(now, self.interval, beat_phase);
        if let Some(every) = self.recheck {
            if session.recheck_session_id().is_some() {
                let phase = session.beat_phase(every);
                if next_phased(since, every, phase) <= now {
                    tick.recheck.push(session.clone());
                }
                next = next.min(next_phased(now, every, phase));
            }
        }
        // Closing deadlines (whole seconds, rounded up: a tick is at most a second late).
        next = next.min(now + (self.idle_ms - idle).div_ceil(1000));
        if let Some(at) = session.expires_at() {
            next = next.min(at);
        }
        if self.max_age_ms > 0 {
            let left = self.max_age_ms - session.age(now_ms).as_millis() as u64;
            next = next.min(now + left.div_ceil(1000));
        }
        if beat {
            tick.records
                .push((session.client_id.clone(), session.presence_projects()));
        }
        if session.is_commands() {
            // A worker's command stream: WebSocket pings on its beat, nothing else.
            if beat {
                session.send_control(tick.ping.clone());
            }
        } else if session.is_story() {
            // The seed's keepalive: its text `ping` each `stories.keepalive_secs` of
            // silence from the client (text messages only: pongs do not count, as in the
            // seed), and WebSocket pings on its beat; never a gateway message.
            let silent = session.text_silence(now_ms).as_secs();
            if silent >= self.keepalive && silent % self.keepalive < (now - since).max(1) {
                session.send_control(tick.story_ping.clone());
            }
            next = next.min(now + self.keepalive - silent % self.keepalive);
            if beat {
                session.send_control(tick.ping.clone());
            }
        } else if beat {
            let key = match &session.scope {
                Scope::Project(p) => p.clone(),
                Scope::User | Scope::Story(_) | Scope::UserStories | Scope::Commands(_) => {
                    format!("\0{}", session.client_id)
                }
            };
            let ping = &tick.ping;
            // The heartbeat and the ping in one buffer: one write, not two, per beat.
            let frames = tick
                .frames
                .entry(key)
                .or_insert_with(|| {
                    let hb = session.encode(&SystemHeartbeat { projects: None }, None);
                    let mut both = bytes::BytesMut::with_capacity(hb.len() + ping.len());
                    both.extend_from_slice(&hb);
                    both.extend_from_slice(ping);
                    both.freeze()
                })
                .clone();
            session.send_control(frames);
        }
        Some(next.max(now + 1))
    }
}

pub async fn run(app: Arc<App>) {
    let mut recheck = SessionRecheck::new(&app);
    let plan = Plan {
        interval: app.config.ws.heartbeat_interval_secs.max(1),
        idle_ms: app.config.ws.idle_timeout_secs.saturating_mul(1000),
        keepalive: app.config.stories.keepalive_secs.max(1),
        max_age_ms: app.config.ws.max_connection_secs.saturating_mul(1000),
        recheck: recheck.as_ref().map(SessionRecheck::every_secs),
    };
    let mut ticker = tokio::time::interval(SWEEP);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh_records(&app, Vec::new()).await;
    let wheel = app.hub.timers();
    // Every connection is looked at least once per beat interval (its beat is always a
    // candidate for its next second).
    wheel.set_max_gap(plan.interval);
    // The seconds handled so far: a late tick catches up the ones it skipped (a wheel
    // slot at a time, at most one turn of the wheel).
    let mut done_upto = unix_millis() / 1000;
    loop {
        ticker.tick().await;
        if app.is_draining() {
            return;
        }
        let now_ms = unix_millis();
        let now = now_ms / 1000;
        let mut tick = Tick {
            now_ms,
            now,
            ping: frame::ping(b"sb"),
            story_ping: frame::text(b"ping"),
            frames: HashMap::new(),
            records: Vec::new(),
            recheck: Vec::new(),
            again: Vec::new(),
        };
        let first = done_upto.max(now.saturating_sub(100)) + 1;
        done_upto = now.max(done_upto);
        for second in first..=now {
            let due = wheel.take(second);
            let mut slice = Slice::new(SLICE);
            for entry in &due {
                if slice.over() {
                    wheel.reschedule(tick.again.drain(..));
                    tokio::task::yield_now().await;
                }
                let Some(session) = entry.item.upgrade() else {
                    continue;
                };
                let since = entry.since(wheel.origin());
                if let Some(at) = plan.visit(&session, since, &mut tick) {
                    tick.again.push((entry.item.clone(), at, now));
                }
            }
            wheel.reschedule(tick.again.drain(..));
        }
        if let Some(recheck) = recheck.as_mut() {
            // Runs in the background: a slow Redis never delays the timer.
            recheck.tick(&app, std::mem::take(&mut tick.recheck));
        }
        // Never let a slow Redis delay the timer.
        let app = app.clone();
        let records = tick.records;
        tokio::spawn(async move { refresh_records(&app, records).await });
    }
}

/// Refreshes the instance's registry entry and command-stream counts (a few keys, every
/// tick) and the TTLs of the records of `ids` (the connections whose beat it is).
async fn refresh_records(app: &App, ids: Vec<(String, Vec<String>)>) {
    let info = json!({
        "instance_id": app.instance_id,
        "connections": app.hub.session_count(),
        "started_secs_ago": app.started.elapsed().as_secs(),
    });
    let command_streams = app.hub.command_stream_counts();
    app.broker
        .refresh_instance(
            &app.instance_id,
            &info,
            &ids,
            &command_streams,
            app.record_ttl(),
        )
        .await;
}
