//! Presence room: `members` sockets join one channel with presence enabled (each with its own
//! key), then all track at once; the figure is the time until every member's state shows all
//! `members` keys, applying `presence_state` and `presence_diff` as realtime-js does.

use crate::client::Received;
use crate::scenario::{Latency, connect_all};
use crate::servers::Target;
use crate::sys::{CpuReport, CpuSampler};
use futures_util::{SinkExt, StreamExt};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub server: String,
    pub members: usize,
    pub connect_join_s: f64,
    /// Time from the first track until the last member's state showed everyone.
    pub converge_all_ms: f64,
    /// Per member: time until its own state showed everyone.
    pub converge: Latency,
    pub converged_members: usize,
    pub frames_in: u64,
    /// Bytes all members received during the tracking phase, divided by the members.
    pub bytes_per_member_join: u64,
    pub track_errors: u64,
    pub cpu: CpuReport,
}

/// The keys of a `presence_state` payload, or of a diff's `joins` / `leaves` (metas skipped).
type Keys<'a> = HashMap<Cow<'a, str>, IgnoredAny>;

#[derive(Deserialize)]
struct Diff<'a> {
    #[serde(borrow, default)]
    joins: Keys<'a>,
    #[serde(borrow, default)]
    leaves: Keys<'a>,
}

#[derive(Deserialize)]
struct V1Frame<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// The event and payload of a V2 array or a V1 object frame.
fn event_and_payload(text: &str) -> Option<(Cow<'_, str>, &RawValue)> {
    if text.starts_with('[') {
        let (_, _, _, event, payload) =
            serde_json::from_str::<(IgnoredAny, IgnoredAny, IgnoredAny, Cow<'_, str>, &RawValue)>(
                text,
            )
            .ok()?;
        Some((event, payload))
    } else {
        let f = serde_json::from_str::<V1Frame<'_>>(text).ok()?;
        Some((f.event, f.payload))
    }
}

/// Applies one presence frame to a member's set of keys, as realtime-js's sync does (leaves,
/// then joins). Parses only the keys: a 1,000-member room sends each member 1,000 diffs.
fn apply(keys: &mut HashSet<String>, text: &str) {
    let Some((event, payload)) = event_and_payload(text) else {
        return;
    };
    match event.as_ref() {
        "presence_state" => {
            if let Ok(state) = serde_json::from_str::<Keys<'_>>(payload.get()) {
                keys.extend(state.into_keys().map(Cow::into_owned));
            }
        }
        "presence_diff" => {
            if let Ok(diff) = serde_json::from_str::<Diff<'_>>(payload.get()) {
                for k in diff.leaves.keys() {
                    keys.remove(k.as_ref());
                }
                for k in diff.joins.into_keys() {
                    if !keys.contains(k.as_ref()) {
                        keys.insert(k.into_owned());
                    }
                }
            }
        }
        _ => {}
    }
}

struct MemberResult {
    converged_us: Option<u64>,
    frames: u64,
    bytes: u64,
    track_error: bool,
}

pub async fn run(target: &Target, members: usize, timeout: Duration) -> anyhow::Result<Outcome> {
    let token = target.endpoint.token.clone();
    let room = format!("presence-{}", std::process::id());
    let (clients, secs) = connect_all(&target.endpoint, members, |i, mut c| {
        let token = token.clone();
        let room = room.clone();
        async move {
            c.join(&room, false, Some(&format!("m{i}")), &token).await?;
            Ok(c)
        }
    })
    .await?;
    let cpu = CpuSampler::start(target.pid);
    let done = CancellationToken::new();
    let start = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(members.max(1));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let done = done.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut r = MemberResult {
                    converged_us: None,
                    frames: 0,
                    bytes: 0,
                    track_error: false,
                };
                let (topic, join_ref) = c.topics[0].clone();
                let track_ref = c.next_ref();
                let track = crate::client::text_frame(
                    c.vsn,
                    Some(join_ref),
                    track_ref,
                    &topic,
                    "presence",
                    &format!(
                        "{{\"type\":\"presence\",\"event\":\"track\",\"payload\":{{\"member\":{i}}}}}"
                    ),
                );
                if c.ws.send(track).await.is_err() {
                    r.track_error = true;
                    let _ = tx.send(()).await;
                    return r;
                }
                let mut keys = HashSet::new();
                loop {
                    let msg = tokio::select! {
                        () = done.cancelled() => break,
                        msg = c.ws.next() => msg,
                    };
                    let Some(Ok(msg)) = msg else { break };
                    r.frames += 1;
                    r.bytes += msg.len() as u64;
                    match crate::client::classify(&msg) {
                        Received::Presence => {
                            if let Ok(text) = msg.to_text() {
                                apply(&mut keys, text);
                            }
                            if r.converged_us.is_none() && keys.len() >= members {
                                r.converged_us =
                                    Some(u64::try_from(start.elapsed().as_micros()).unwrap_or(0));
                                let _ = tx.send(()).await;
                            }
                        }
                        Received::Reply { msg_ref, ok } if msg_ref == Some(track_ref) && !ok => {
                            r.track_error = true;
                        }
                        _ => {}
                    }
                }
                r
            })
        })
        .collect();
    drop(tx);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut converged = 0;
    while converged < members {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(())) => converged += 1,
            _ => break,
        }
    }
    let converge_all = start.elapsed();
    done.cancel();
    let mut times = Vec::new();
    let (mut frames, mut bytes, mut errors) = (0, 0, 0);
    for t in tasks {
        let r = t.await?;
        frames += r.frames;
        bytes += r.bytes;
        errors += u64::from(r.track_error);
        if let Some(us) = r.converged_us {
            times.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }
    let cpu = cpu.finish();
    let converged_members = times.len();
    Ok(Outcome {
        server: target.name.clone(),
        members,
        connect_join_s: (secs * 1000.0).round() / 1000.0,
        converge_all_ms: if converged_members == members {
            (converge_all.as_secs_f64() * 1e6).round() / 1000.0
        } else {
            f64::INFINITY
        },
        converge: Latency::from_us(&mut times),
        converged_members,
        frames_in: frames,
        bytes_per_member_join: bytes / members.max(1) as u64,
        track_errors: errors,
        cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_diffs_apply_like_realtime_js() {
        let mut keys = HashSet::new();
        apply(
            &mut keys,
            r#"["1",null,"realtime:r","presence_state",{"a":{"metas":[{"phx_ref":"1"}]}}]"#,
        );
        apply(
            &mut keys,
            r#"[null,null,"realtime:r","presence_diff",{"joins":{"b":{"metas":[{"phx_ref":"2","n":{"x":1}}]}},"leaves":{}}]"#,
        );
        assert_eq!(keys.len(), 2);
        // A re-track: the same key leaves and joins in one diff.
        apply(
            &mut keys,
            r#"[null,null,"realtime:r","presence_diff",{"joins":{"b":{"metas":[]}},"leaves":{"b":{"metas":[]}}}]"#,
        );
        apply(
            &mut keys,
            r#"[null,null,"realtime:r","presence_diff",{"joins":{},"leaves":{"a":{"metas":[]}}}]"#,
        );
        assert_eq!(keys, HashSet::from(["b".to_owned()]));
        apply(
            &mut keys,
            r#"{"topic":"realtime:r","event":"presence_diff","payload":{"joins":{"c":{"metas":[]}},"leaves":{}},"ref":null}"#,
        );
        assert_eq!(keys.len(), 2);
    }
}
