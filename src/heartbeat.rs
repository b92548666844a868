//! One shared timer for every connection: heartbeats, idle drop, credential expiry, the
//! revoked-session recheck ([`crate::revocation`]), and the TTLs of this instance's Redis
//! records.
//!
//! No connection owns a timer (DESIGN "Small connections"): a sweep runs every second over
//! the sessions, and every `WS_HEARTBEAT_INTERVAL` it also queues `system.heartbeat` plus a
//! WebSocket ping for each (the heartbeat frame is encoded once per project per tick) and
//! refreshes `ws:instance:{id}` and every `ws:connection:*` of this instance in pipelined
//! round trips.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use crate::app::App;
use crate::event::unix_millis;
use crate::revocation::SessionRecheck;
use crate::schema::types::SystemHeartbeat;
use crate::session::Scope;
use crate::ws::close_code;
use crate::ws::frame;

const SWEEP: Duration = Duration::from_secs(1);

pub async fn run(app: Arc<App>) {
    let interval = Duration::from_secs(app.config.ws.heartbeat_interval_secs);
    let idle_limit = Duration::from_secs(app.config.ws.idle_timeout_secs);
    let keepalive = app.config.stories.keepalive_secs.max(1);
    let max_age = Duration::from_secs(app.config.ws.max_connection_secs);
    let mut ticker = tokio::time::interval(SWEEP.min(interval));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Beats are scheduled on a fixed grid, so sweep jitter never stretches the interval.
    let mut next_beat = Instant::now() + interval;
    let mut recheck = SessionRecheck::new(&app);
    refresh_records(&app).await;
    loop {
        ticker.tick().await;
        if app.is_draining() {
            return;
        }
        let now_ms = unix_millis();
        let now_secs = now_ms / 1000;
        let beat = Instant::now() + SWEEP / 4 >= next_beat;
        if beat {
            next_beat += interval;
            if next_beat < Instant::now() {
                next_beat = Instant::now() + interval;
            }
        }
        let ping = frame::ping(b"sb");
        let story_ping = frame::text(b"ping");
        let mut frames: HashMap<String, Bytes> = HashMap::new();
        for session in app.hub.sessions() {
            if session.outbox.is_closing() || session.is_held() {
                continue;
            }
            if session.expires_at().is_some_and(|at| at <= now_secs) {
                session.close(close_code::EXPIRED, "credential expired", false);
                continue;
            }
            if !max_age.is_zero() && session.age(now_ms) >= max_age {
                // The seed's WS_CONNECTION_TIMEOUT: a connection's longest life. 1001:
                // clients reconnect (and resume) as after any going-away.
                session.close(close_code::GOING_AWAY, "connection timeout", false);
                continue;
            }
            if session.idle_for(now_ms) >= idle_limit {
                // From the sweep's task, in the connection's span; client_id is repeated for
                // filters that leave the span out.
                session.span().in_scope(|| {
                    tracing::info!(client_id = %session.client_id, "idle timeout: dropping connection");
                });
                session.close(close_code::GOING_AWAY, "idle timeout", true);
                continue;
            }
            if session.is_commands() {
                // A worker's command stream: WebSocket pings on the beat, nothing else.
                if beat {
                    session.send_control(ping.clone());
                }
                continue;
            }
            if session.is_story() {
                // The seed's keepalive: its text `ping` once per `stories.keepalive_secs` of
                // client text silence (pongs do not count, as in the seed) (the sweep runs every second: one window, one ping), and
                // WebSocket pings on the beat; never a gateway message.
                let idle = session.text_silence(now_ms).as_secs();
                if idle >= keepalive && idle % keepalive == 0 {
                    session.send_control(story_ping.clone());
                }
                if beat {
                    session.send_control(ping.clone());
                }
                continue;
            }
            if beat {
                let key = match &session.scope {
                    Scope::Project(p) => p.clone(),
                    Scope::User | Scope::Story(_) | Scope::UserStories | Scope::Commands(_) => {
                        format!("\0{}", session.client_id)
                    }
                };
                let hb = frames
                    .entry(key)
                    .or_insert_with(|| session.encode(&SystemHeartbeat { projects: None }, None))
                    .clone();
                session.send_control(hb);
                session.send_control(ping.clone());
            }
        }
        if let Some(recheck) = recheck.as_mut() {
            // Runs in the background: a slow Redis never delays the sweep.
            recheck.tick(&app, Instant::now());
        }
        if beat {
            // Never let a slow Redis delay the sweep.
            let app = app.clone();
            tokio::spawn(async move { refresh_records(&app).await });
        }
    }
}

async fn refresh_records(app: &App) {
    let ids: Vec<(String, Vec<String>)> = app
        .hub
        .sessions()
        .iter()
        .map(|s| (s.client_id.clone(), s.presence_projects()))
        .collect();
    let info = json!({
        "instance_id": app.instance_id,
        "connections": ids.len(),
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
