//! Presence (protocol.md §6): `presence_state` after the join reply, `presence_diff` to every
//! subscriber including the tracker, re-track and untrack, and the leave when a socket drops.

use realtime_protocol::Vsn;
use realtime_tests::gateway::{Client, Received, TestGateway, TextFrame};
use serde_json::{Value, json};

const ROOM: &str = "realtime:lobby";

fn presence(key: &str, enabled: bool) -> Value {
    json!({
        "broadcast": {"ack": false, "self": false},
        "presence": {"key": key, "enabled": enabled},
        "postgres_changes": [],
        "private": false
    })
}

/// Joins and returns the client, its join_ref and the `presence_state` that follows the reply.
async fn join_presence(gw: &TestGateway, vsn: Vsn, key: &str) -> (Client, String, TextFrame) {
    let mut c = gw.connect(vsn).await.expect("connect");
    let (jr, _) = c.join_ok(ROOM, presence(key, true)).await.expect("join");
    // The reply was first; presence_state is the very next frame.
    let state = c.recv_text().await.expect("presence_state");
    assert_eq!(state.event, "presence_state", "{}", state.raw);
    if vsn == Vsn::V2 {
        assert_eq!(state.join_ref, json!(jr));
    }
    assert_eq!(state.msg_ref, Value::Null);
    (c, jr, state)
}

async fn track(c: &mut Client, jr: &str, meta: Value) -> anyhow::Result<Vec<Received>> {
    let r = c
        .push(
            Some(jr),
            ROOM,
            "presence",
            &json!({"type": "presence", "event": "track", "payload": meta}),
        )
        .await?;
    let (reply, before) = c
        .recv_until(|f| f.text().is_some_and(|t| t.msg_ref == json!(r)))
        .await?;
    let reply = reply.text().unwrap();
    assert_eq!(reply.event, "phx_reply");
    assert_eq!(
        reply.payload,
        json!({"status": "ok", "response": {}}),
        "{}",
        reply.raw
    );
    Ok(before)
}

/// The metas of `key` in a state or in a diff's joins/leaves, without the `phx_ref*` fields.
fn metas(v: &Value, key: &str) -> Vec<Value> {
    v[key]["metas"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|mut m| {
            let o = m.as_object_mut().expect("meta object");
            assert!(
                o.remove("phx_ref").is_some_and(|r| r.is_string()),
                "phx_ref"
            );
            o.remove("phx_ref_prev");
            m
        })
        .collect()
}

async fn next_diff(c: &mut Client) -> anyhow::Result<TextFrame> {
    let d = c.expect_event(ROOM, "presence_diff").await?;
    assert_eq!(d.join_ref, Value::Null, "fastlane: null refs");
    assert_eq!(d.msg_ref, Value::Null);
    Ok(d)
}

#[tokio::test]
async fn state_is_empty_then_diffs_reach_everyone_including_the_tracker() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr, state) = join_presence(&gw, Vsn::V2, "user-a").await;
    assert_eq!(state.payload, json!({}));
    let (mut b, _, _) = join_presence(&gw, Vsn::V1, "user-b").await;

    let before = track(&mut a, &ajr, json!({"online_at": "now"})).await?;
    // The tracker's own diff may come before or after its reply.
    let diff = match before
        .into_iter()
        .find(|f| f.is_event(ROOM, "presence_diff"))
    {
        Some(Received::Text(t)) => t,
        _ => next_diff(&mut a).await?,
    };
    assert_eq!(
        metas(&diff.payload["joins"], "user-a"),
        vec![json!({"online_at": "now"})]
    );
    assert_eq!(diff.payload["leaves"], json!({}));
    let diff_b = next_diff(&mut b).await?;
    assert_eq!(diff_b.payload, diff.payload, "one diff for everyone");
    a.expect_nothing().await?;
    b.expect_nothing().await?;
    Ok(())
}

#[tokio::test]
async fn late_joiner_gets_the_state_and_drop_sends_leave() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr, _) = join_presence(&gw, Vsn::V2, "user-a").await;
    track(&mut a, &ajr, json!({"n": 1})).await?;
    a.sync().await?;

    let (mut b, bjr, state) = join_presence(&gw, Vsn::V2, "user-b").await;
    assert_eq!(metas(&state.payload, "user-a"), vec![json!({"n": 1})]);
    assert_eq!(state.payload.as_object().map(|o| o.len()), Some(1));
    track(&mut b, &bjr, json!({"n": 2})).await?;
    let d = next_diff(&mut a).await?;
    assert_eq!(metas(&d.payload["joins"], "user-b"), vec![json!({"n": 2})]);

    // B's socket goes away without a leave: A sees B leave.
    drop(b);
    let d = next_diff(&mut a).await?;
    assert_eq!(d.payload["joins"], json!({}));
    assert_eq!(metas(&d.payload["leaves"], "user-b"), vec![json!({"n": 2})]);

    // A third joiner sees only A.
    let (_c, _, state) = join_presence(&gw, Vsn::V1, "user-c").await;
    assert_eq!(metas(&state.payload, "user-a"), vec![json!({"n": 1})]);
    assert!(state.payload.get("user-b").is_none(), "{}", state.raw);
    Ok(())
}

#[tokio::test]
async fn retrack_updates_and_untrack_leaves() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr, _) = join_presence(&gw, Vsn::V2, "user-a").await;
    let (mut b, _, _) = join_presence(&gw, Vsn::V2, "user-b").await;
    track(&mut a, &ajr, json!({"status": "online"})).await?;
    let first = next_diff(&mut b).await?;
    let first_ref = first.payload["joins"]["user-a"]["metas"][0]["phx_ref"].clone();

    // Same payload again: ok, no diff.
    track(&mut a, &ajr, json!({"status": "online"})).await?;
    a.sync().await?;
    b.expect_nothing().await?;

    // A different payload: the new meta joins with phx_ref_prev, the old one leaves.
    track(&mut a, &ajr, json!({"status": "away"})).await?;
    let d = next_diff(&mut b).await?;
    let joined = &d.payload["joins"]["user-a"]["metas"][0];
    assert_eq!(joined["status"], "away");
    assert_eq!(joined["phx_ref_prev"], first_ref);
    assert_eq!(
        d.payload["leaves"]["user-a"]["metas"][0]["phx_ref"],
        first_ref
    );

    // Untrack.
    let r = a
        .push(
            Some(&ajr),
            ROOM,
            "presence",
            &json!({"type": "presence", "event": "untrack"}),
        )
        .await?;
    let (reply, _) = a
        .recv_until(|f| f.text().is_some_and(|t| t.msg_ref == json!(r)))
        .await?;
    assert_eq!(reply.text().unwrap().status(), Some("ok"));
    let d = next_diff(&mut b).await?;
    assert_eq!(
        metas(&d.payload["leaves"], "user-a"),
        vec![json!({"status": "away"})]
    );
    Ok(())
}

#[tokio::test]
async fn presence_disabled_join_gets_no_state_but_still_sees_diffs() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let mut quiet = gw.connect(Vsn::V2).await?;
    quiet.join_ok(ROOM, presence("", false)).await?;
    quiet.expect_nothing().await?;
    let (mut a, ajr, _) = join_presence(&gw, Vsn::V2, "user-a").await;
    track(&mut a, &ajr, json!({})).await?;
    // Public channels deliver diffs whether or not presence was enabled (§6.2, §10.1).
    let d = next_diff(&mut quiet).await?;
    assert_eq!(metas(&d.payload["joins"], "user-a"), vec![json!({})]);
    Ok(())
}

#[tokio::test]
async fn same_key_on_two_sockets_gives_two_metas() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr, _) = join_presence(&gw, Vsn::V2, "shared").await;
    let (mut b, bjr, _) = join_presence(&gw, Vsn::V2, "shared").await;
    track(&mut a, &ajr, json!({"d": "phone"})).await?;
    track(&mut b, &bjr, json!({"d": "laptop"})).await?;
    let (_c, _, state) = join_presence(&gw, Vsn::V2, "observer").await;
    let mut got = metas(&state.payload, "shared");
    got.sort_by_key(|m| m["d"].as_str().unwrap_or_default().to_owned());
    assert_eq!(got, vec![json!({"d": "laptop"}), json!({"d": "phone"})]);
    Ok(())
}

#[tokio::test]
async fn invalid_track_payload_is_an_error_reply_and_keeps_the_channel() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr, _) = join_presence(&gw, Vsn::V2, "user-a").await;
    let r = a
        .push(
            Some(&ajr),
            ROOM,
            "presence",
            &json!({"type": "presence", "event": "track", "payload": [1, 2]}),
        )
        .await?;
    assert_eq!(
        a.recv_text().await?.raw_json(),
        json!([ajr, r, ROOM, "phx_reply", {"status": "error", "response": {"reason": "Presence track payload must be a map"}}])
    );
    let r = a
        .push(
            Some(&ajr),
            ROOM,
            "presence",
            &json!({"type": "presence", "event": "dance"}),
        )
        .await?;
    assert_eq!(
        a.recv_text().await?.raw_json(),
        json!([ajr, r, ROOM, "phx_reply", {"status": "error", "response": {}}])
    );
    // Case-insensitive event name.
    let r = a
        .push(
            Some(&ajr),
            ROOM,
            "presence",
            &json!({"type": "presence", "event": "TRACK", "payload": {"ok": true}}),
        )
        .await?;
    let (reply, _) = a
        .recv_until(|f| f.text().is_some_and(|t| t.msg_ref == json!(r)))
        .await?;
    assert_eq!(reply.text().unwrap().status(), Some("ok"));
    Ok(())
}

#[tokio::test]
async fn presence_rate_limit_closes_the_channel() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| c.client_presence_max_calls = 3).await?;
    let (mut a, ajr, _) = join_presence(&gw, Vsn::V2, "user-a").await;
    for n in 0..3 {
        track(&mut a, &ajr, json!({ "n": n })).await?;
    }
    a.sync().await?;
    a.push(
        Some(&ajr),
        ROOM,
        "presence",
        &json!({"type": "presence", "event": "track", "payload": {"n": 9}}),
    )
    .await?;
    let (system, _) = a.recv_until(|f| f.is_event(ROOM, "system")).await?;
    let system = system.text().unwrap();
    assert_eq!(
        system.payload,
        json!({"extension": "system", "status": "error", "message": "Client presence rate limit exceeded", "channel": "lobby"})
    );
    assert_eq!(system.join_ref, json!(ajr));
    let close = a.recv_text().await?;
    assert_eq!(close.raw_json(), json!([ajr, ajr, ROOM, "phx_close", {}]));
    Ok(())
}

#[tokio::test]
async fn oversized_track_closes_the_channel() -> anyhow::Result<()> {
    let gw = TestGateway::start_with(|c| c.max_payload_size_in_kb = 1).await?;
    let (mut a, ajr, _) = join_presence(&gw, Vsn::V2, "user-a").await;
    let (mut b, _, _) = join_presence(&gw, Vsn::V2, "user-b").await;
    a.push(
        Some(&ajr),
        ROOM,
        "presence",
        &json!({"type": "presence", "event": "track", "payload": {"s": "x".repeat(3000)}}),
    )
    .await?;
    let system = a.recv_text().await?;
    assert_eq!(system.event, "system", "{}", system.raw);
    assert_eq!(system.payload["message"], "Track message size exceeded");
    assert_eq!(
        a.recv_text().await?.raw_json(),
        json!([ajr, ajr, ROOM, "phx_close", {}])
    );
    a.sync().await?;
    b.expect_nothing().await?;
    Ok(())
}

#[tokio::test]
async fn leave_removes_presence_for_the_others() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (mut a, ajr, _) = join_presence(&gw, Vsn::V1, "user-a").await;
    let (mut b, _, _) = join_presence(&gw, Vsn::V2, "user-b").await;
    track(&mut a, &ajr, json!({"k": "v"})).await?;
    next_diff(&mut b).await?;
    let r = a.push(Some(&ajr), ROOM, "phx_leave", &json!({})).await?;
    a.expect_reply(&r).await?;
    let d = next_diff(&mut b).await?;
    assert_eq!(
        metas(&d.payload["leaves"], "user-a"),
        vec![json!({"k": "v"})]
    );
    Ok(())
}

/// What a realtime-js client would show: key → phx_refs, from a state and the diffs after it.
#[derive(Default, Debug, PartialEq)]
struct View(std::collections::BTreeMap<String, std::collections::BTreeSet<String>>);

impl View {
    fn refs(v: &Value) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (key, entry) in v.as_object().into_iter().flatten() {
            for m in entry["metas"].as_array().into_iter().flatten() {
                out.push((
                    key.clone(),
                    m["phx_ref"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
        out
    }

    fn apply(&mut self, frame: &TextFrame) {
        match frame.event.as_str() {
            "presence_state" => {
                self.0.clear();
                for (k, r) in View::refs(&frame.payload) {
                    self.0.entry(k).or_default().insert(r);
                }
            }
            "presence_diff" => {
                for (k, r) in View::refs(&frame.payload["joins"]) {
                    self.0.entry(k).or_default().insert(r);
                }
                for (k, r) in View::refs(&frame.payload["leaves"]) {
                    if let Some(set) = self.0.get_mut(&k) {
                        set.remove(&r);
                        if set.is_empty() {
                            self.0.remove(&k);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn concurrent_joins_tracks_and_drops_converge() -> anyhow::Result<()> {
    let gw = std::sync::Arc::new(TestGateway::start().await?);
    // Twenty clients join, track twice and (half of them) drop, all at once; each keeps its own
    // view from its presence_state and the diffs it receives.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            let vsn = if i % 2 == 0 { Vsn::V1 } else { Vsn::V2 };
            let mut c = gw.connect(vsn).await?;
            let jr = c
                .join(
                    ROOM,
                    &json!({"config": presence(&format!("user-{}", i % 7), true)}),
                )
                .await?;
            let mut view = View::default();
            for n in 0..2 {
                c.push(
                    Some(&jr),
                    ROOM,
                    "presence",
                    &json!({"type": "presence", "event": "track", "payload": {"n": n, "i": i}}),
                )
                .await?;
            }
            for r in c.sync().await? {
                if let Some(t) = r.text() {
                    view.apply(t);
                }
            }
            anyhow::Ok((i, c, view))
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await??);
    }
    // Drop the odd ones.
    clients.retain(|(i, _, _)| i % 2 == 0);
    // The survivors catch up until they agree with a fresh observer.
    let (mut observer, _, _) = join_presence(&gw, Vsn::V2, "observer").await;
    observer.sync().await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut fresh_client = gw.connect(Vsn::V2).await?;
        fresh_client
            .join(ROOM, &json!({"config": presence("", true)}))
            .await?;
        let (state, _) = fresh_client
            .recv_until(|f| f.is_event(ROOM, "presence_state"))
            .await?;
        let mut truth = View::default();
        truth.apply(state.text().unwrap());
        drop(fresh_client);
        let expected_keys = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
            .iter()
            .map(|i| i % 7)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let mut all_agree = truth.0.len() == expected_keys;
        for (_, c, view) in clients.iter_mut() {
            for r in c.sync().await? {
                if let Some(t) = r.text() {
                    view.apply(t);
                }
            }
            // The observer (and the fresh client's untracked join) may or may not be in the view
            // yet; compare the tracked users only.
            let users = |v: &View| {
                v.0.iter()
                    .filter(|(k, _)| k.starts_with("user-"))
                    .map(|(k, s)| (k.clone(), s.clone()))
                    .collect::<Vec<_>>()
            };
            all_agree &= users(view) == users(&truth);
        }
        if all_agree {
            // Ten survivors, one meta each (the second track replaced the first).
            let metas: usize = truth
                .0
                .iter()
                .filter(|(k, _)| k.starts_with("user-"))
                .map(|(_, s)| s.len())
                .sum();
            assert_eq!(metas, 10, "{truth:?}");
            return Ok(());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "views never converged: truth {truth:?}, views {:?}",
            clients.iter().map(|(i, _, v)| (i, v)).collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
