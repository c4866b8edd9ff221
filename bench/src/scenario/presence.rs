//! Presence room: `members` sockets join one channel with presence enabled (each with its own
//! key), then all track at once; the figure is the time until every member's state shows all
//! `members` keys, applying `presence_state` and `presence_diff` as realtime-js does.

use crate::client::Received;
use crate::scenario::{Latency, connect_all};
use crate::servers::Target;
use crate::sys::{CpuReport, CpuSampler};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashSet;
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

/// Applies one presence frame to a member's set of keys.
fn apply(keys: &mut HashSet<String>, text: &str) {
    let Ok((_, _, _, event, payload)) =
        serde_json::from_str::<(Value, Value, String, String, Value)>(text)
    else {
        return;
    };
    let names = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_object)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    match event.as_str() {
        "presence_state" => keys.extend(names(Some(&payload))),
        "presence_diff" => {
            for k in names(payload.get("leaves")) {
                keys.remove(&k);
            }
            keys.extend(names(payload.get("joins")));
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
