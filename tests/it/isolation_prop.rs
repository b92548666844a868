//! Property: no event ever reaches a connection of another project, whatever the order of
//! connects, subscribes, unsubscribes, publishes and disconnects; and every connection
//! subscribed to a project when an event is published gets that event, once, in order.
//!
//! Runs in process against the real gateway parts: an `App` with the embedded broker
//! (publishing assigns seqs and fans out through the hub), sessions set up as the handshake
//! does (gate closed, registered, joined, greeted, socket attached) on real loopback
//! sockets, subscribe/unsubscribe sent as client text messages through
//! `connection::messages::handle_text` (credential checks included), disconnects torn down as
//! the connection task does. Every frame a client socket receives is decoded and checked
//! against a model of who was subscribed to what at the time of each publish. Connections
//! are `/ws/{project}` (optionally with a `*` credential) or `/ws/user` (several projects);
//! some subscribes ask for projects the credential does not grant and must be refused.
//! A `Settle` step lets the hub's unsubscribe-linger timers fire between operations, so
//! slots are reaped and recreated in every order.

use std::collections::{BTreeSet, HashMap};
use std::io::{ErrorKind, Read};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use serde_json::{json, Value};
use switchboard::app::App;
use switchboard::config::Config;
use switchboard::connection::messages::{handle_text, ClientState};
use switchboard::session::{Scope, Session};
use switchboard_middleware::{Claims, CredentialKind};

const PROJECTS: [&str; 3] = ["alpha", "beta", "gamma"];

#[derive(Debug, Clone)]
enum Op {
    /// `/ws/{project}` when `project` is Some, else `/ws/user`. `grants` is a bit set over
    /// PROJECTS (the endpoint's own project is always granted: otherwise the handshake
    /// refuses with 4003 and there is no connection); `star` adds a `*` grant, which
    /// `/ws/user` does not accept, so it is only used with a project.
    Connect {
        project: Option<usize>,
        grants: u8,
        star: bool,
    },
    Subscribe {
        conn: usize,
        project: usize,
    },
    Unsubscribe {
        conn: usize,
        project: usize,
    },
    /// `count` events published in one call (one broker batch).
    Publish {
        project: usize,
        count: usize,
    },
    Disconnect {
        conn: usize,
    },
    /// Lets spawned tasks run: the hub drops an idle project's slot after the linger time.
    Settle,
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PROJECTS.len();
    prop_oneof![
        2 => (proptest::option::weighted(0.7, p.clone()), 0u8..8, any::<bool>())
            .prop_map(|(project, grants, star)| Op::Connect { project, grants, star: star && project.is_some() }),
        3 => (0usize..8, p.clone()).prop_map(|(conn, project)| Op::Subscribe { conn, project }),
        2 => (0usize..8, p.clone()).prop_map(|(conn, project)| Op::Unsubscribe { conn, project }),
        4 => (p, 1usize..4).prop_map(|(project, count)| Op::Publish { project, count }),
        1 => (0usize..8).prop_map(|conn| Op::Disconnect { conn }),
        1 => Just(Op::Settle),
    ]
}

/// What the model knows of one connection, next to the real session and its client socket.
struct Conn {
    session: Arc<Session>,
    state: ClientState,
    /// Kept to wait for writability; dropped at disconnect so the socket closes.
    server: Option<Arc<tokio::net::TcpStream>>,
    client: std::net::TcpStream,
    received: Vec<u8>,
    grants: BTreeSet<usize>,
    star: bool,
    subscribed: BTreeSet<usize>,
    alive: bool,
}

impl Conn {
    /// Reads whatever the client socket holds without blocking.
    fn read_available(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.client.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => self.received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("client read failed: {e}"),
            }
        }
    }

    /// After the server side is gone: everything it ever wrote, up to EOF.
    fn read_to_end(&mut self) {
        self.client.set_nonblocking(false).unwrap();
        self.client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        self.client
            .read_to_end(&mut rest)
            .expect("server side closed: EOF expected");
        self.received.extend_from_slice(&rest);
    }

    /// Flushes the outbox if a backlog formed (the connection task's job in the gateway).
    async fn flush(&mut self) {
        let Some(server) = self.server.clone() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.session.outbox.has_pending() {
            assert!(Instant::now() < deadline, "outbox never drained");
            self.read_available();
            self.session.outbox.drain();
            let _ = tokio::time::timeout(Duration::from_millis(10), server.writable()).await;
        }
        self.read_available();
    }
}

/// Text frames of a server byte stream (server frames are never masked).
fn text_frames(mut bytes: &[u8]) -> Vec<Value> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 2, "truncated frame header");
        let (header, len) = match bytes[1] & 0x7f {
            126 => (4, u16::from_be_bytes([bytes[2], bytes[3]]) as usize),
            127 => (
                10,
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
            ),
            n => (2, n as usize),
        };
        assert!(bytes.len() >= header + len, "truncated frame");
        if bytes[0] & 0x0f == 0x1 {
            let payload = &bytes[header..header + len];
            if payload != b"pong" {
                out.push(serde_json::from_slice(payload).expect("text frame is JSON"));
            }
        }
        bytes = &bytes[header + len..];
    }
    out
}

/// A published event: its project and who was subscribed to that project at the time.
struct Published {
    project: usize,
    subscribers: BTreeSet<usize>,
}

async fn connect(app: &Arc<App>, project: Option<usize>, grants: u8, star: bool) -> Conn {
    let mut granted: BTreeSet<usize> = (0..PROJECTS.len())
        .filter(|i| grants & (1 << i) != 0)
        .collect();
    match project {
        Some(p) => {
            granted.insert(p);
        }
        // `/ws/user` without any named project is refused (4003): name one.
        None if granted.is_empty() => {
            granted.insert(0);
        }
        None => {}
    }
    let mut claim_projects: Vec<String> = granted.iter().map(|&i| PROJECTS[i].into()).collect();
    if star {
        claim_projects.push("*".into());
    }
    let claims = Arc::new(Claims {
        sub: "prop-user".into(),
        projects: claim_projects,
        stories: Default::default(),
        role: None,
        exp: None,
        kind: CredentialKind::Jwt,
    });
    let (scope, initial): (Scope, BTreeSet<usize>) = match project {
        Some(p) => (Scope::Project(PROJECTS[p].into()), [p].into()),
        None => (Scope::User, granted.clone()),
    };
    // As handshake.rs: gate closed, registered, joined, then greeted, then the socket.
    let session = Session::new(
        uuid::Uuid::new_v4().to_string(),
        claims,
        scope,
        initial.iter().map(|&i| PROJECTS[i].to_owned()).collect(),
        IpAddr::from([127, 0, 0, 1]),
        None,
        app.outbox_limits(),
    );
    session.hold();
    app.hub.register(&session);
    for &p in &initial {
        app.hub
            .join(PROJECTS[p], &session, true)
            .await
            .expect("join");
    }
    switchboard::greeting::greet(app, &session, None).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client.set_nonblocking(true).unwrap();
    let (server, _) = listener.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    let server = Arc::new(tokio::net::TcpStream::from_std(server).unwrap());
    session.outbox.attach(server.clone());
    let mut conn = Conn {
        session,
        state: ClientState::new(&app.config.ws),
        server: Some(server),
        client,
        received: Vec::new(),
        grants: granted,
        star,
        subscribed: initial,
        alive: true,
    };
    conn.flush().await;
    conn
}

/// Tears a connection down the way the connection task ends.
fn disconnect(app: &Arc<App>, conn: &mut Conn) {
    conn.session.abort();
    conn.session.outbox.detach();
    app.hub.unregister(&conn.session);
    conn.server = None;
    conn.alive = false;
    conn.subscribed.clear();
}

fn config() -> Config {
    let mut config = Config::default();
    // Embedded broker; no limits that would refuse or close a connection for its own
    // behaviour, so only routing decides what arrives.
    config.redis.url = None;
    config.redis.unsubscribe_linger_ms = 1;
    config.ws.client_messages_per_sec = 0;
    config.ws.outbound_queue_messages = 1 << 16;
    config.ws.outbound_queue_bytes = 1 << 26;
    config.events.allow_unknown_types = false;
    config
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let app = App::build(config()).expect("app");
    let mut conns: Vec<Conn> = Vec::new();
    let mut published: Vec<Published> = Vec::new();
    for op in ops {
        match op {
            Op::Connect {
                project,
                grants,
                star,
            } => conns.push(connect(&app, project, grants, star).await),
            Op::Subscribe { conn, project } | Op::Unsubscribe { conn, project } => {
                if conns.is_empty() {
                    continue;
                }
                let n = conns.len();
                let c = &mut conns[conn % n];
                if !c.alive {
                    continue;
                }
                let subscribe = matches!(op, Op::Subscribe { .. });
                let kind = if subscribe {
                    "subscribe"
                } else {
                    "unsubscribe"
                };
                let text = json!({"type": kind, "project_id": PROJECTS[project]}).to_string();
                handle_text(&app, &c.session, &mut c.state, &text).await;
                if !subscribe {
                    c.subscribed.remove(&project);
                } else if c.star || c.grants.contains(&project) {
                    c.subscribed.insert(project);
                }
            }
            Op::Publish { project, count } => {
                let mut events = Vec::new();
                for _ in 0..count {
                    let id = published.len();
                    published.push(Published {
                        project,
                        subscribers: (0..conns.len())
                            .filter(|&i| conns[i].alive && conns[i].subscribed.contains(&project))
                            .collect(),
                    });
                    events.push(
                        json!({"type": "file.changed", "file_path": format!("e{id}")})
                            .to_string()
                            .into_bytes(),
                    );
                }
                app.broker
                    .publish_events(PROJECTS[project], events)
                    .await
                    .expect("publish");
            }
            Op::Disconnect { conn } => {
                if !conns.is_empty() {
                    let n = conns.len();
                    disconnect(&app, &mut conns[conn % n]);
                }
            }
            Op::Settle => tokio::time::sleep(Duration::from_millis(3)).await,
        }
        for c in conns.iter_mut().filter(|c| c.alive) {
            c.flush().await;
        }
    }
    for c in conns.iter_mut() {
        if c.alive {
            c.flush().await;
            disconnect(&app, c);
        }
        c.read_to_end();
    }
    // Nothing is left behind in the hub once everyone is gone.
    prop_assert_eq!(app.hub.session_count(), 0);
    for p in PROJECTS {
        prop_assert!(
            app.hub.project_sessions(p).is_empty(),
            "{} kept sessions",
            p
        );
    }

    for (i, c) in conns.iter().enumerate() {
        let mut got = Vec::new();
        for frame in text_frames(&c.received) {
            if frame["type"] != "file.changed" {
                continue;
            }
            let id: usize = frame["file_path"].as_str().unwrap()[1..].parse().unwrap();
            let event = &published[id];
            prop_assert_eq!(
                frame["project_id"].as_str(),
                Some(PROJECTS[event.project]),
                "event e{} framed with another project",
                id
            );
            prop_assert!(
                event.subscribers.contains(&i),
                "connection {} got e{} of {} without being subscribed to it then",
                i,
                id,
                PROJECTS[event.project]
            );
            got.push(id);
        }
        let expected: Vec<usize> = (0..published.len())
            .filter(|&id| published[id].subscribers.contains(&i))
            .collect();
        prop_assert_eq!(
            &got,
            &expected,
            "connection {} got other events than it was subscribed to (in publish order)",
            i
        );
    }
    Ok(())
}

proptest! {
    // 512 cases of up to 48 operations: under 10 s in a debug build on two busy cores.
    // PROPTEST_CASES=N sets another count for a longer hunt.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn events_never_cross_projects(ops in proptest::collection::vec(op(), 1..48)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(ops))?;
    }
}

/// The model is only as good as its operations: a fixed interleaving that exercises each
/// path once (forbidden subscribe, unsubscribe and resubscribe across a reaped slot,
/// `/ws/user`, disconnect mid-stream), so a harness change that silently stops delivering
/// cannot make the property pass vacuously.
#[test]
fn the_model_sees_deliveries() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let app = App::build(config()).unwrap();
        let mut a = connect(&app, Some(0), 0, false).await; // /ws/alpha
        let mut u = connect(&app, None, 0b110, false).await; // /ws/user: beta, gamma
        let text = |kind: &str, p: &str| json!({"type": kind, "project_id": p}).to_string();
        handle_text(&app, &a.session, &mut a.state, &text("subscribe", "beta")).await; // forbidden
        for p in PROJECTS {
            let ev = json!({"type": "file.changed", "file_path": p}).to_string();
            app.broker
                .publish_events(p, vec![ev.into_bytes()])
                .await
                .unwrap();
        }
        handle_text(
            &app,
            &u.session,
            &mut u.state,
            &text("unsubscribe", "gamma"),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(5)).await; // gamma's slot is reaped
        let ev = json!({"type": "file.changed", "file_path": "gamma-2"}).to_string();
        app.broker
            .publish_events("gamma", vec![ev.into_bytes()])
            .await
            .unwrap();
        handle_text(&app, &u.session, &mut u.state, &text("subscribe", "gamma")).await;
        let ev = json!({"type": "file.changed", "file_path": "gamma-3"}).to_string();
        app.broker
            .publish_events("gamma", vec![ev.into_bytes()])
            .await
            .unwrap();
        let mut paths = HashMap::new();
        for c in [&mut a, &mut u] {
            c.flush().await;
            disconnect(&app, c);
            c.read_to_end();
            let got: Vec<String> = text_frames(&c.received)
                .into_iter()
                .filter(|f| f["type"] == "file.changed")
                .map(|f| f["file_path"].as_str().unwrap().to_owned())
                .collect();
            paths.insert(c.session.client_id.clone(), got);
        }
        assert_eq!(paths[&a.session.client_id], ["alpha"]);
        assert_eq!(paths[&u.session.client_id], ["beta", "gamma", "gamma-3"]);
    });
}
