//! The shared sweep spreads heartbeats over the interval (issue 13 item 1): each connection
//! beats once per interval in its own second, so a beat never lands on every connection at
//! once, and none is skipped or doubled.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test]
async fn heartbeats_are_spread_over_the_interval_one_per_connection_per_interval() {
    let gw = GatewayOpts::new().heartbeat(4).idle(60).start();
    let token = gw.token("hb", &["hb"]);
    let mut clients = Vec::new();
    for _ in 0..24 {
        clients.push(gw.connect("hb", &token).await.0);
        // Connect times a few ms apart, as real clients are.
        tokio::time::sleep(Duration::from_millis(7)).await;
    }
    // Two intervals and a bit: every client beats twice (or three times at the edges),
    // never more, and the beats of all clients fall in more than one second. The extra
    // 1.5 s absorbs a timer tick running late on a loaded machine (the whole suite in
    // parallel on two cores).
    let start = Instant::now();
    let window = Duration::from_millis(9_500);
    let reads = clients.iter_mut().map(|c| async move {
        let mut at = Vec::new();
        loop {
            let left = window.saturating_sub(start.elapsed());
            if left.is_zero() {
                return at;
            }
            match c.next_frame(left).await {
                Some(Frame::Text(t)) if t.contains("system.heartbeat") => {
                    at.push(start.elapsed().as_secs())
                }
                Some(Frame::Text(t)) => panic!("unexpected {t}"),
                Some(Frame::Ping) | Some(Frame::Pong) => {}
                None => return at,
                other => panic!("{other:?}"),
            }
        }
    });
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    for at in futures_util::future::join_all(reads).await {
        assert!((2..=3).contains(&at.len()), "beats at {at:?} in {window:?}");
        for s in at {
            *per_second.entry(s).or_default() += 1;
        }
    }
    assert!(
        per_second.len() >= 5,
        "beats all in the same seconds: {per_second:?}"
    );
}
