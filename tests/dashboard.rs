//! The built-in dashboard (`GET /`) and the browser example client, in headless Chromium
//! driven through the DevTools protocol against a running relay. Needs `chromium`
//! (`.ci/run` installs it); outside CI the tests are skipped without it. Each test saves
//! screenshots (tests/common/browser.rs says where).

mod common;
use std::time::{Duration, Instant};

use common::browser::Browser;
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECS: Duration = Duration::from_secs(10);

/// One browser at a time: the tests measure the page's pace, and two Chromiums on two
/// cores measure each other.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn chromium() -> bool {
    have_tool("chromium", &["--version"], "apt-get install chromium")
}

async fn dashboard(relay: &Relay, query: &str) -> Browser {
    let url = format!("http://{}/?access_token={}{query}", relay.ws, relay.token);
    Browser::open(&url).await
}

/// The dashboard signed in with the relay's token, once its status says `live`.
async fn live_dashboard(relay: &Relay) -> Browser {
    let mut page = dashboard(relay, "").await;
    page.wait_for(
        "document.getElementById('status').textContent === 'live'",
        SECS,
        "document.getElementById('status').textContent",
    )
    .await;
    page
}

/// Neither the page nor its address keeps the credential once it connected.
async fn assert_no_token(page: &mut Browser, relay: &Relay) {
    let html = page.eval("document.documentElement.outerHTML").await;
    let href = page.eval("location.href").await;
    let token = &relay.token;
    assert!(!html.as_str().unwrap().contains(token), "token in the page");
    assert!(
        !href.as_str().unwrap().contains(token),
        "token in the address: {href}"
    );
}

fn line(v: Value) -> String {
    format!("{v}\n")
}

fn approval(id: &str, agent: &str, at: &str) -> String {
    line(
        json!({"type": "approval_requested", "timestamp": at, "agent": agent,
        "session_id": "sess-1", "data": {"approval_id": id, "capability": "process.run",
        "arguments": {"command": "kubectl apply"}, "reason": format!("{id} needs a human")}}),
    )
}

fn health(severity: &str, component: &str) -> String {
    line(
        json!({"type": "health_alert", "timestamp": "2026-03-15T10:56:00.000Z", "agent": null,
        "data": {"component": component, "severity": severity, "message": format!("{component} is {severity}"), "threshold": "80%"}}),
    )
}

/// Text of every row of a panel's table, one array of cells per row.
const ROWS: &str = "(id) => [...document.querySelectorAll(`#${id} tbody tr`)].map((r) => [...r.cells].map((c) => c.textContent))";

#[tokio::test]
async fn attention_panels_rebuild_from_since_and_follow_approvals() {
    if !chromium() {
        return;
    }
    let _alone = ONE_BROWSER.lock().await;
    let relay = Relay::start().await;
    let mut input = SEED.to_string();
    input += &approval("appr-old", "deploy-agent", "2026-03-15T10:40:00.000Z");
    input += &approval("appr-new", "research-agent", "2026-03-15T10:41:00.000Z");
    input += &health("warning", "disk");
    input += &health("critical", "ingest");
    // Event text is shown as text: markup in it must not become elements or run.
    input += &line(
        json!({"type": "policy_violation", "timestamp": "2026-03-15T10:44:00.000Z",
        "agent": "research-agent", "session_id": "sess-1", "data": {"capability": "process.run",
        "rule": "<b id=bold>rule</b>", "tier": "blocked",
        "reason": "<img id=pwn src=x onerror=\"window.pwned=1\">"}}),
    );
    let summary = relay.publish(&input).await;
    assert_eq!(summary.last().unwrap()["accepted"], 16, "{summary:?}");

    // `since=0`: every panel is rebuilt from what the relay retains, so approvals that were
    // already waiting when the page opened are there.
    let mut page = dashboard(&relay, "&since=0").await;
    page.wait_for("kruxStats.received === 16", SECS, "kruxStats")
        .await;
    let pending = format!("({ROWS})('pending-approvals').map((r) => r[4])");
    page.wait_for(
        &format!("JSON.stringify({pending}) === '[\"appr-old\",\"appr-new\"]'"),
        SECS,
        &pending,
    )
    .await;
    // The seed's own approval was resolved: it is not waiting.
    let text = page
        .eval("document.getElementById('attention').innerText")
        .await;
    let text = text.as_str().unwrap();
    assert!(!text.contains("appr-x1y2z3"), "{text}");
    assert!(text.contains("appr-old needs a human"), "{text}");
    assert!(text.contains("system.deny_dangerous_commands"), "{text}");
    assert!(text.contains("PolicyDenied"), "{text}");
    assert!(text.contains("<b id=bold>rule</b>: <img id=pwn"), "{text}");
    let injected = page
        .eval("!!document.getElementById('pwn') || !!document.getElementById('bold') || !!window.pwned")
        .await;
    assert_eq!(injected, false, "event text became markup");
    let health_rows = page.eval(&format!("({ROWS})('health')")).await;
    assert_eq!(
        health_rows[0][0], "critical",
        "the worst first: {health_rows}"
    );
    // One row per component, with how many alerts it raised.
    assert_eq!(health_rows.as_array().unwrap().len(), 2, "{health_rows}");
    assert_eq!(health_rows[1][1], "disk");
    assert_eq!(health_rows[1][3], "×2");
    assert_eq!(
        page.eval("document.getElementById('agents-count').textContent")
            .await,
        "4"
    );
    assert_eq!(
        page.eval("document.getElementById('status').textContent")
            .await,
        "live"
    );
    page.screenshot("dashboard-attention").await;

    // A decision removes the request; a new one appears, after the older ones.
    let resolved = line(
        json!({"type": "approval_resolved", "timestamp": "2026-03-15T10:42:00.000Z",
        "agent": "deploy-agent", "data": {"approval_id": "appr-old", "decision": "approved",
        "decided_by": "admin", "decided_at": "2026-03-15T10:42:00.000Z"}}),
    );
    let later = approval("appr-later", "scraper-agent", "2026-03-15T10:43:00.000Z");
    relay.publish(&(resolved + &later)).await;
    page.wait_for(
        &format!("JSON.stringify({pending}) === '[\"appr-new\",\"appr-later\"]'"),
        SECS,
        &pending,
    )
    .await;
    assert_no_token(&mut page, &relay).await;
}

#[tokio::test]
async fn an_agent_click_filters_the_stream_and_pause_resume_loses_nothing() {
    if !chromium() {
        return;
    }
    let _alone = ONE_BROWSER.lock().await;
    let relay = Relay::start().await;
    relay.publish(SEED).await;
    let mut page = dashboard(&relay, "&since=0").await;
    page.wait_for("kruxStats.received === 11", SECS, "kruxStats")
        .await;
    let agents_of_rows = format!("({ROWS})('events').map((r) => r[2])");

    // Clicking an agent narrows the stream to it: what the page held, then what the relay
    // sends on a connection with `agent=` (another agent's events must not appear).
    page.wait_for(
        "!!document.querySelector('#agents tr[data-agent=\"research-agent\"]')",
        SECS,
        "document.getElementById('agents').innerText",
    )
    .await;
    page.eval("document.querySelector('#agents tr[data-agent=\"research-agent\"]').click()")
        .await;
    let research_in_seed = SEED.matches(r#""agent":"research-agent""#).count();
    page.wait_for(
        &format!("{agents_of_rows}.length === {research_in_seed}"),
        SECS,
        &agents_of_rows,
    )
    .await;
    let mut more = String::new();
    for agent in ["research-agent", "deploy-agent", "research-agent"] {
        more += &line(
            json!({"type": "capability_invoked", "timestamp": "2026-03-15T10:30:00.000Z",
            "agent": agent, "session_id": "sess-1", "data": {"capability": "filesystem.read",
            "arguments": {}, "permission_tier": "autonomous", "duration_ms": 1}}),
        );
    }
    assert_eq!(relay.publish(&more).await[0]["accepted"], 3);
    page.wait_for("kruxStats.received === 14", SECS, "kruxStats")
        .await;
    page.wait_for(
        &format!("{agents_of_rows}.length === {}", research_in_seed + 2),
        SECS,
        &agents_of_rows,
    )
    .await;
    let shown = page.eval(&agents_of_rows).await;
    assert!(
        shown
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a == "research-agent"),
        "{shown}"
    );
    assert_eq!(
        page.eval("document.getElementById('stream-state').textContent")
            .await,
        "filtered: agent=research-agent"
    );
    page.screenshot("dashboard-filtered").await;

    // Unfiltered again, then paused: events keep arriving (the counters move), the stream
    // holds still, and resuming brings every missed event, once, in order.
    page.eval("document.getElementById('clear').click()").await;
    let top_seq = "document.querySelector('#events tbody tr').dataset.seq";
    page.wait_for(
        &format!("{top_seq} === String(mainSeq) && {agents_of_rows}.length === 14"),
        SECS,
        &agents_of_rows,
    )
    .await;
    page.eval("document.getElementById('pause').click()").await;
    let before = page.eval(top_seq).await;
    let mut fleet = krux_relay::fleet::Fleet::new(20, 7);
    let burst: String = (0..300).map(|_| fleet.next_line() + "\n").collect();
    assert_eq!(relay.publish(&burst).await[0]["accepted"], 300);
    page.wait_for("kruxStats.received === 314", SECS, "kruxStats")
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await; // a few renders
    assert_eq!(
        page.eval(top_seq).await,
        before,
        "a paused stream holds still"
    );
    assert!(page
        .eval("document.getElementById('stream-state').textContent")
        .await
        .as_str()
        .unwrap()
        .starts_with("paused"));
    page.screenshot("dashboard-paused").await;

    page.eval("document.getElementById('pause').click()").await;
    page.wait_for(
        "stream.last === mainSeq && document.querySelector('#events tbody tr').dataset.seq === String(mainSeq)",
        SECS,
        "[stream.last, mainSeq]",
    )
    .await;
    // The stream holds exactly what the unfiltered connection received: nothing lost,
    // nothing twice, in seq order.
    let same = page
        .eval("JSON.stringify(stream.rows.map((e) => e.seq)) === JSON.stringify(recent.map((e) => e.seq))")
        .await;
    assert_eq!(
        same,
        true,
        "{}",
        page.eval("[stream.rows.length, recent.length]").await
    );

    // A row's JSON is the event as the relay sent it.
    page.eval("document.querySelector('#events tbody tr').click()")
        .await;
    let detail: Value = serde_json::from_str(
        page.eval("document.getElementById('detail').textContent")
            .await
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(detail["seq"], page.eval("mainSeq").await);
    assert!(detail.get("receivedAt").is_none(), "{detail}");
    page.screenshot("dashboard-json").await;
}

/// A resume point the relay no longer retains shows as a notice, never silently; the page
/// reconnects by itself with `since` after the relay restarts, and counts it on screen.
#[tokio::test]
async fn it_resumes_after_a_restart_and_shows_a_replay_gap() {
    if !chromium() {
        return;
    }
    let _alone = ONE_BROWSER.lock().await;
    let mut relay = Relay::start_with(&["--replay", "10"]).await;
    relay.publish(SEED).await;
    let mut page = dashboard(&relay, "&since=0").await;
    // Seq 1 is gone from a 10-event window: the page says so.
    page.wait_for(
        "!document.getElementById('gap-notice').hidden",
        SECS,
        "document.body.innerText",
    )
    .await;
    let notice = page
        .eval("document.getElementById('gap-text').textContent")
        .await;
    assert!(
        notice.as_str().unwrap().contains("after #0 and before #2"),
        "{notice}"
    );
    page.wait_for("kruxStats.received === 10", SECS, "kruxStats")
        .await;
    page.screenshot("dashboard-gap").await;

    let same = [relay.ws, relay.ingest, relay.admin].map(|a| a.to_string());
    let ports = [
        "--listen", &same[0], "--ingest", &same[1], "--admin", &same[2],
    ];
    relay.crash_and_restart(&ports).await;
    page.wait_for(
        "document.getElementById('status').textContent === 'live' && document.getElementById('reconnects').textContent !== '0'",
        Duration::from_secs(20),
        "document.getElementById('conn').innerText",
    )
    .await;
    assert_eq!(relay.publish(SEED).await[0]["accepted"], 11);
    page.wait_for("kruxStats.received === 21", SECS, "kruxStats")
        .await;
    // The restarted relay's window starts empty, so the resume point is behind it: that is
    // said too, and everything published after the reconnection arrived.
    assert_eq!(
        page.eval("kruxStats.gaps").await,
        2,
        "{}",
        page.eval("kruxStats").await
    );
}

/// 50,000 events/s for 10 s from a fleet of agents: the page's own counter ends equal to
/// what the relay accepted, and the page keeps drawing frames meanwhile.
#[tokio::test]
async fn the_dashboard_keeps_up_with_50k_events_per_second() {
    if !chromium() {
        return;
    }
    let _alone = ONE_BROWSER.lock().await;
    const RATE: usize = 50_000;
    const SECONDS: usize = 10;
    let relay = Relay::start().await;
    let mut page = live_dashboard(&relay).await;

    // A tenth of a second of a fleet's events, made before the clock starts and sent ten
    // times a second: this process's share of the two cores stays small.
    let mut fleet = krux_relay::fleet::Fleet::new(50, 11);
    let tick = Duration::from_millis(100);
    let chunk: String = (0..RATE / 10).map(|_| fleet.next_line() + "\n").collect();
    let mut ingest = tokio::net::TcpStream::connect(relay.ingest).await.unwrap();
    let frames_before = page.eval("kruxStats.frames").await.as_u64().unwrap();
    let started = Instant::now();
    let mut late_ticks = 0;
    for i in 0..SECONDS * 10 {
        ingest.write_all(chunk.as_bytes()).await.unwrap();
        let due = started + tick * (i as u32 + 1);
        if Instant::now() > due {
            late_ticks += 1;
        }
        tokio::time::sleep_until(due.into()).await;
    }
    let sent_for = started.elapsed();
    let frames = page.eval("kruxStats.frames").await.as_u64().unwrap() - frames_before;
    ingest.shutdown().await.unwrap();
    let mut summary = String::new();
    ingest.read_to_string(&mut summary).await.unwrap();
    let summary: Value = serde_json::from_str(summary.trim()).unwrap();
    assert_eq!(summary["accepted"], RATE * SECONDS, "{summary}");

    page.wait_for(
        &format!("kruxStats.received === {}", RATE * SECONDS),
        Duration::from_secs(60),
        "kruxStats",
    )
    .await;
    let caught_up = started.elapsed();
    let stats = page.eval("kruxStats").await;
    let fps = frames as f64 / sent_for.as_secs_f64();
    eprintln!(
        "50k/s for {SECONDS} s: sent in {sent_for:?} ({late_ticks} late ticks), page caught up \
         after {caught_up:?}, {fps:.1} frames/s while sending, stats {stats}"
    );
    page.screenshot("dashboard-50k").await;
    // Drawing went on under load (a page blocked by the stream would draw ~0 frames).
    assert!(fps >= 5.0, "{fps:.1} frames/s");
    // The stream shows the newest events, bounded.
    let rows = page
        .eval("document.querySelectorAll('#events tbody tr').length")
        .await;
    assert_eq!(rows, 200);
    page.wait_for(
        "document.querySelector('#events tbody tr').dataset.seq === String(mainSeq)",
        SECS,
        "[document.querySelector('#events tbody tr').dataset.seq, mainSeq]",
    )
    .await;
}

/// `examples/clients/browser.html` on `krux-client.js`, opened from disk (origin `null`,
/// which the relay admits only when told to): it subscribes with the filters and `since`
/// from its address, shows each event once, stops after `count`, and leaves no token in
/// the page.
#[tokio::test]
async fn the_browser_example_client_replays_filtered_events_and_stops() {
    if !chromium() {
        return;
    }
    let _alone = ONE_BROWSER.lock().await;
    let relay = Relay::start_with(&["--allowed-origin", "null"]).await;
    assert_eq!(relay.publish(SEED).await[0]["accepted"], 11);
    let page = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/clients/browser.html");
    let url = format!(
        "file://{page}?url=ws://{}&token={}&type=policy_violation,health_alert&since=0&count=2",
        relay.ws, relay.token
    );
    let mut page = Browser::open(&url).await;
    page.wait_for(
        "document.getElementById('status').textContent === 'done'",
        SECS,
        "document.body.innerText",
    )
    .await;
    assert_eq!(
        page.eval("document.getElementById('count').textContent")
            .await,
        "2"
    );
    let items = page
        .eval("[...document.querySelectorAll('li')].map((li) => li.textContent)")
        .await;
    assert_eq!(
        items,
        json!(["#4 policy_violation research-agent", "#11 health_alert -"])
    );
    let html = page.eval("document.documentElement.outerHTML").await;
    assert!(!html.as_str().unwrap().contains(&relay.token));
}

/// Legal but hostile event text: ten events with a 1 MB field among a running fleet, and
/// names with bidi overrides. Every event is shown, cut for display (the JSON view keeps
/// it whole), the page keeps drawing, and the overrides are shown escaped, not applied.
#[tokio::test]
async fn large_fields_and_bidi_overrides_neither_stall_nor_fool_the_page() {
    if !chromium() {
        return;
    }
    let _alone = ONE_BROWSER.lock().await;
    let relay = Relay::start().await;
    let mut page = live_dashboard(&relay).await;
    // The fleet runs at ~2,000 events/s in the background for the whole test.
    let ingest = relay.ingest;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let fleet = tokio::spawn(async move {
        let mut fleet = krux_relay::fleet::Fleet::new(20, 7);
        let mut s = tokio::net::TcpStream::connect(ingest).await.unwrap();
        while !*stop_rx.borrow() {
            let chunk: String = (0..100).map(|_| fleet.next_line() + "\n").collect();
            s.write_all(chunk.as_bytes()).await.unwrap();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop_rx.changed() => {}
            }
        }
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let big = "x".repeat(1 << 20);
    let mut lines = String::new();
    for i in 0..10 {
        lines += &line(
            json!({"type": "health_alert", "agent": format!("\u{202e}big-{i}"),
            "data": {"component": format!("disk-{i}"), "severity": "warning", "message": big, "threshold": "t"}}),
        );
    }
    let frames_before = page.eval("kruxStats.frames").await.as_u64().unwrap();
    let sent = Instant::now();
    let replies = relay.publish(&lines).await;
    assert_eq!(
        replies.last().unwrap()["accepted"],
        10,
        "{:?}",
        &replies.last()
    );
    // Every one in the health panel, its message cut.
    page.wait_for(
        "[...document.querySelectorAll('#health tbody tr')].filter((tr) => tr.textContent.includes('disk-')).length === 10",
        SECS,
        "document.querySelector('#health tbody').textContent.length",
    )
    .await;
    let shown_after = sent.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let frames = page.eval("kruxStats.frames").await.as_u64().unwrap() - frames_before;
    let fps = frames as f64 / sent.elapsed().as_secs_f64();
    stop_tx.send(true).unwrap();
    fleet.await.unwrap();
    eprintln!("ten 1 MB events shown after {shown_after:?}; {fps:.0} frames/s meanwhile");
    let longest = page
        .eval("Math.max(...[...document.querySelectorAll('#health td')].map((td) => td.textContent.length))")
        .await
        .as_u64()
        .unwrap();
    assert!(longest < 300, "a cell of {longest} characters");
    let cut = page
        .eval("[...document.querySelectorAll('#health td')].some((td) => td.textContent.endsWith('(1,048,576 characters)'))")
        .await;
    assert_eq!(cut, json!(true));
    // The bidi override is shown as an escape, not applied to the agent's name.
    let names = page
        .eval("[...document.querySelectorAll('#agents tbody tr')].map((tr) => tr.dataset.agent ? tr.cells[0].textContent : '').filter((t) => t.includes('big-'))")
        .await;
    let names: Vec<String> = serde_json::from_value(names).unwrap();
    assert!(!names.is_empty());
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("\\u{202e}big-") && !n.contains('\u{202e}')),
        "{names:?}"
    );
    // The issue's targets: every event shown within 2 s, and at least 30 frames/s drawn
    // meanwhile (55 and 0.4 s measured on this machine type; a stalled page drew 2-5).
    assert!(shown_after < Duration::from_secs(2), "{shown_after:?}");
    assert!(fps >= 30.0, "{fps:.1} frames/s");
}

/// The token never sits in an address the browser keeps or sends: an old `?access_token=`
/// link is redirected to the fragment form, the page takes the token from there and drops
/// it from its address, the navigation record holds no query token, and the tab signs in
/// again from `sessionStorage` after a reload.
#[tokio::test]
async fn the_token_stays_out_of_addresses_and_survives_a_reload_in_the_tab() {
    if !chromium() {
        return;
    }
    let _alone = ONE_BROWSER.lock().await;
    let relay = Relay::start().await;
    let (status, head, _) = raw_http(
        relay.ws,
        &format!(
            "GET /?access_token={}&agent=a HTTP/1.1\r\nHost: x\r\n\r\n",
            relay.token
        ),
    )
    .await;
    assert_eq!(status, 303);
    assert!(
        head.contains(&format!("Location: /?agent=a#access_token={}", relay.token)),
        "{head}"
    );
    let mut page = Browser::open(&format!(
        "http://{}/#access_token={}",
        relay.ws, relay.token
    ))
    .await;
    let live = "document.getElementById('status').textContent === 'live'";
    page.wait_for(live, SECS, "document.getElementById('status').textContent")
        .await;
    assert_no_token(&mut page, &relay).await;
    let nav = page
        .eval("performance.getEntriesByType('navigation').map((e) => e.name).join(' ')")
        .await;
    assert!(!nav.as_str().unwrap().contains("?access_token"), "{nav}");
    assert_eq!(
        page.eval("sessionStorage.getItem('krux-token')").await,
        json!(relay.token)
    );
    page.eval("location.reload()").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    page.wait_for(live, SECS, "document.getElementById('status').textContent")
        .await;
    assert_no_token(&mut page, &relay).await;
}

/// The page trusts no type: an event whose fields hold objects where text is expected
/// (one whose `toString` is not a function makes `String(x)` throw) is drawn as text, and
/// the panels go on drawing the events after it. The ingest refuses such an event in the
/// seed's fields, so it is handed to the page's own event handler here.
#[tokio::test]
async fn an_event_of_unexpected_types_is_drawn_as_text_and_stops_nothing() {
    if !chromium() {
        return;
    }
    let _alone = ONE_BROWSER.lock().await;
    let relay = Relay::start().await;
    let mut page = live_dashboard(&relay).await;
    let poison = r#"({type: "policy_violation", agent: "poison-agent", seq: 1, timestamp: "2026-12-06T00:00:00.000Z",
        session_id: {toString: 1}, data: {capability: {toString: 1}, rule: [1, {a: 2}], reason: {toString: 1},
        tier: "t", session_id: {toString: 1}}})"#;
    page.eval(&format!("onMainEvent({poison}), true")).await;
    let next = json!({"type": "health_alert", "agent": "after-agent",
        "data": {"component": "disk", "severity": "warning", "message": "m", "threshold": "t"}});
    assert_eq!(relay.publish(&line(next)).await[0]["accepted"], 1);
    page.wait_for(
        "document.querySelector('#agents tbody').textContent.includes('after-agent') && document.querySelector('#health tbody').textContent.includes('disk')",
        SECS,
        "document.body.innerText.slice(0, 3000)",
    )
    .await;
    let violations = page
        .eval("document.querySelector('#violations tbody').textContent")
        .await;
    let text = violations.as_str().unwrap();
    assert!(
        text.contains("poison-agent") && text.contains(r#"{"toString":1}"#),
        "{text}"
    );
    assert!(text.contains(r#"[1,{"a":2}]"#), "{text}");
}
