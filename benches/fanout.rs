//! Hot-path benches: envelope check + framing of one event, and fan-out of one event to
//! 10,000 subscriber queues (the hub's part of a delivery, without sockets).

use std::net::IpAddr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use switchboard::event::{prepare_project_event, prepare_received};
use switchboard::hub::Hub;
use switchboard::schema::Policy;
use switchboard::session::outbox::Limits;
use switchboard::session::{Scope, Session};
use switchboard_middleware::{Claims, CredentialKind};

const EVENT: &[u8] = br#"{"type":"task.progress","task_id":"t-1","node_id":"n-1","progress":{"percentage":42.5,"current_step":2,"total_steps":4,"step_description":"Generating image"},"project_id":"p","timestamp":"2026-11-23T12:00:00.000Z"}"#;
const STRICT: Policy = Policy {
    allow_unknown_types: false,
    max_json_depth: 64,
};
/// `EVENT` as the publish script PUBLISHes it (seq and the publish mark at the end).
const EVENT_MARKED: &[u8] = br#"{"type":"task.progress","task_id":"t-1","node_id":"n-1","progress":{"percentage":42.5,"current_step":2,"total_steps":4,"step_description":"Generating image"},"project_id":"p","timestamp":"2026-11-23T12:00:00.000Z","seq":1234,"epoch":"0f3a9c2e4b7d"}"#;
/// `EVENT` published raw by a legacy worker that put its own seq in it.
const EVENT_RAW_SEQ: &[u8] = br#"{"type":"task.progress","task_id":"t-1","node_id":"n-1","progress":{"percentage":42.5,"current_step":2,"total_steps":4,"step_description":"Generating image"},"project_id":"p","timestamp":"2026-11-23T12:00:00.000Z","seq":999}"#;
const EVENT_TO_FILL: &[u8] =
    br#"{"type":"node.state.updated","node_id":"n-1","state":"processing"}"#;

fn sessions(n: usize) -> Vec<Arc<Session>> {
    let claims = Arc::new(Claims {
        sub: "bench".into(),
        projects: vec!["p".into()],
        stories: Default::default(),
        role: None,
        exp: None,
        kind: CredentialKind::Jwt,
    });
    (0..n)
        .map(|i| {
            Session::new(
                format!("c{i}"),
                claims.clone(),
                Scope::Project("p".into()),
                vec!["p".into()],
                IpAddr::from([127, 0, 0, 1]),
                None,
                Limits {
                    messages: 1 << 20,
                    bytes: 1 << 30,
                },
            )
        })
        .collect()
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("event");
    g.throughput(Throughput::Elements(1));
    g.bench_function("prepare_passthrough", |b| {
        b.iter(|| prepare_project_event("p", EVENT, None).unwrap())
    });
    g.bench_function("prepare_validated", |b| {
        b.iter(|| prepare_project_event("p", EVENT, Some(&STRICT)).unwrap())
    });
    g.bench_function("prepare_fill", |b| {
        b.iter(|| prepare_project_event("p", EVENT_TO_FILL, Some(&STRICT)).unwrap())
    });
    // What the pub/sub reader does per event (docs/protocol.md §3, raw seq never trusted).
    g.bench_function("received_plain", |b| {
        b.iter(|| prepare_received("p", EVENT, Some(&STRICT)).unwrap())
    });
    g.bench_function("received_marked", |b| {
        b.iter(|| prepare_received("p", EVENT_MARKED, Some(&STRICT)).unwrap())
    });
    g.bench_function("received_raw_seq_stripped", |b| {
        b.iter(|| prepare_received("p", EVENT_RAW_SEQ, Some(&STRICT)).unwrap())
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let hub = Hub::standalone(STRICT);
    let all = sessions(10_000);
    rt.block_on(async {
        for s in &all {
            hub.register(s);
            hub.join("p", s, false).await.unwrap();
        }
    });
    let prepared = prepare_project_event("p", EVENT, None).unwrap();
    let mut g = c.benchmark_group("hub");
    g.throughput(Throughput::Elements(all.len() as u64));
    g.bench_function("deliver_one_event_to_10k_queues", |b| {
        b.iter_batched(
            || {
                for s in &all {
                    s.outbox.drain();
                }
            },
            |_| hub.deliver("p", &prepared),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, encode, fanout);
criterion_main!(benches);
