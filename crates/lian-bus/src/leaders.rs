//! Stream leaders spread over a cluster's nodes. NATS places each stream's and bucket's
//! leader where its election lands, and on a fresh three-node cluster that is often one node
//! for all ten: that node then takes every write and every ack of the fleet while the other
//! two only follow. The roles ask once as they start (after the topology), an operator with
//! `lian nats rebalance`: a node leading more than its share, ceil(streams / nodes), hands
//! the excess over by a leader stepdown naming the least-loaded follower as the preferred
//! next leader (`$JS.API.STREAM.LEADER.STEPDOWN.<stream>` with
//! `{"placement":{"preferred":"<server>"}}`, nats-server >= 2.11: `jsStreamLeaderStepDownRequest`
//! and `getStepDownPreferredPlacement` in server/jetstream_api.go).
//!
//! Nothing is asked when no node is over its share, so a balanced cluster is left alone and
//! roles starting together converge instead of undoing each other's moves: each plans from
//! the same status the same moves, a plan is checked against the stream's leader right
//! before each stepdown (skipped if it changed or is electing), and a stepdown the other
//! starter asked first ("already leader", "not leader", "temporarily unavailable") counts as
//! skipped once the stream is seen led elsewhere. Each role asks once per start: a cluster
//! that loses balance later (a node restarted) is spread by the next start or by
//! `lian nats rebalance`, never by a loop.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::topology::StreamStatus;
use crate::{Bus, BusError};

/// How long one stepdown request may wait for its answer.
const STEPDOWN_PATIENCE: Duration = Duration::from_secs(5);
/// How long to wait for the streams moved to have a leader again.
const ELECTION_PATIENCE: Duration = Duration::from_secs(10);
/// How long to wait, after a refused stepdown, for the stream to move anyway (another role
/// starting at the same time asked the same).
const CONTENDED_PATIENCE: Duration = Duration::from_secs(2);

/// One move a spread planned: `stream`'s leadership from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderMove {
    pub stream: String,
    pub from: String,
    pub to: String,
    pub outcome: MoveOutcome,
}

/// What became of a planned move.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "result", content = "detail")]
pub enum MoveOutcome {
    /// Not asked yet (a plan).
    Planned,
    /// The stream's leader is now this server (the preferred one, or another the election
    /// chose).
    Moved(String),
    /// Not asked: the stream's leader changed since the plan (another starter moved it).
    Skipped(String),
    /// The stepdown was refused or not answered in time, or no leader was seen in time.
    Failed(String),
}

/// The moves that bring every node to at most its share of leaders, ceil(led streams /
/// nodes), each to the least-loaded caught-up follower of that stream that is under its
/// share; none when no node is over its share. Nodes are the servers holding a copy that is
/// not offline; streams without a leader (electing) count for nobody and are not moved.
pub fn plan_spread(status: &[StreamStatus]) -> Vec<LeaderMove> {
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for s in status {
        if !s.leader.is_empty() {
            *load.entry(s.leader.as_str()).or_default() += 1;
        }
        for f in s.followers.iter().filter(|f| !f.offline) {
            load.entry(f.server.as_str()).or_default();
        }
    }
    let led: usize = load.values().sum();
    if load.len() < 2 || led == 0 {
        return Vec::new();
    }
    let share = led.div_ceil(load.len());
    let mut moves = Vec::new();
    for s in status.iter().filter(|s| !s.leader.is_empty()) {
        if load[s.leader.as_str()] <= share {
            continue;
        }
        let target = s
            .followers
            .iter()
            .filter(|f| f.current && !f.offline && load[f.server.as_str()] < share)
            .min_by_key(|f| (load[f.server.as_str()], f.server.as_str()));
        if let Some(target) = target {
            *load.get_mut(s.leader.as_str()).expect("counted") -= 1;
            *load.get_mut(target.server.as_str()).expect("counted") += 1;
            moves.push(LeaderMove {
                stream: s.stream.clone(),
                from: s.leader.clone(),
                to: target.server.clone(),
                outcome: MoveOutcome::Planned,
            });
        }
    }
    moves
}

/// Leaders per node (every node holding a copy that is not offline, 0 included).
pub fn leaders_per_node(status: &[StreamStatus]) -> BTreeMap<String, usize> {
    let mut load = BTreeMap::new();
    for s in status {
        for f in s.followers.iter().filter(|f| !f.offline) {
            load.entry(f.server.clone()).or_insert(0);
        }
        if !s.leader.is_empty() {
            *load.entry(s.leader.clone()).or_insert(0) += 1;
        }
    }
    load
}

/// The server's answer to a stepdown: `{"success":true}` or an API error.
#[derive(serde::Deserialize)]
struct StepDownAck {
    #[serde(default)]
    success: bool,
}

impl Bus {
    /// Spreads the leaders of lian's streams and buckets over the cluster (see the module):
    /// plans from `topology_status`, asks each stepdown (bounded), then waits (bounded) for
    /// the moved streams to have a leader again, and returns every planned move with its
    /// outcome. On a lone server, or when no node leads more than its share, it asks
    /// nothing. A move that fails is in the result (and logged), not an error: only reading
    /// the status can fail this.
    pub async fn spread_leaders(&self) -> Result<Vec<LeaderMove>, BusError> {
        if self.cluster_size() < 2 {
            return Ok(Vec::new());
        }
        let mut moves = plan_spread(&self.topology_status().await?);
        let mut asked = Vec::with_capacity(moves.len());
        for m in &moves {
            asked.push(self.step_down(&m.stream, &m.from, &m.to).await);
        }
        // A stepdown only starts an election: wait (bounded) for each stream asked to have
        // a leader other than the one it had, so what starts next (a worker's pull, a
        // client's publish) finds one. A refused stepdown is waited on briefly too: when
        // roles start together, the other one's stepdown of the same stream makes this one
        // answer "not leader" or "temporarily unavailable", and the stream moves all the same.
        let deadline = tokio::time::Instant::now() + ELECTION_PATIENCE;
        for (m, asked) in moves.iter_mut().zip(asked) {
            let until = match &asked {
                Asked::Skipped(why) => {
                    m.outcome = MoveOutcome::Skipped(why.clone());
                    continue;
                }
                Asked::Yes => deadline,
                Asked::Refused(_) => deadline.min(tokio::time::Instant::now() + CONTENDED_PATIENCE),
            };
            let moved = loop {
                match self.stream_leader(&m.stream).await {
                    Ok(leader) if !leader.is_empty() && leader != m.from => break Some(leader),
                    _ if tokio::time::Instant::now() >= until => break None,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            m.outcome = match (asked, moved) {
                (Asked::Yes, Some(now)) => MoveOutcome::Moved(now),
                (Asked::Yes, None) => MoveOutcome::Failed(format!(
                    "asked, but no other leader seen within {} s",
                    ELECTION_PATIENCE.as_secs()
                )),
                (Asked::Refused(_), Some(now)) => {
                    MoveOutcome::Skipped(format!("moved by another at the same time (now led by {now})"))
                }
                (Asked::Refused(why), None) => MoveOutcome::Failed(why),
                (Asked::Skipped(_), _) => unreachable!("skipped above"),
            };
        }
        for m in &moves {
            match &m.outcome {
                MoveOutcome::Moved(now) => {
                    tracing::info!(stream = %m.stream, from = %m.from, to = %now, "stream leader moved to spread leaders over the cluster")
                }
                MoveOutcome::Skipped(why) => {
                    tracing::info!(stream = %m.stream, from = %m.from, to = %m.to, why = %why, "stream leader move skipped")
                }
                MoveOutcome::Failed(why) => {
                    tracing::warn!(stream = %m.stream, from = %m.from, to = %m.to, why = %why, "stream leader move failed; the leader stays where it is")
                }
                MoveOutcome::Planned => {}
            }
        }
        Ok(moves)
    }

    /// The server leading `stream` now (empty while it elects one).
    async fn stream_leader(&self, stream: &str) -> Result<String, BusError> {
        let mut s = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| BusError::nats("open stream", e))?;
        let info = s.info().await.map_err(|e| BusError::nats("stream info", e))?;
        Ok(info.cluster.as_ref().and_then(|c| c.leader.clone()).unwrap_or_default())
    }

    /// Asks `stream`'s leader, if it is still `from`, to hand over to `to`.
    async fn step_down(&self, stream: &str, from: &str, to: &str) -> Asked {
        use async_nats::jetstream::response::Response;
        match self.stream_leader(stream).await {
            Ok(now) if now.is_empty() => return Asked::Skipped("it is electing a leader (another moved it)".into()),
            Ok(now) if now != from => return Asked::Skipped(format!("its leader is now {now}")),
            Ok(_) => {}
            Err(e) => return Asked::Refused(e.to_string()),
        }
        let body = serde_json::json!({ "placement": { "preferred": to } });
        let answer = tokio::time::timeout(
            STEPDOWN_PATIENCE,
            self.js
                .request::<_, _, Response<StepDownAck>>(format!("STREAM.LEADER.STEPDOWN.{stream}"), &body),
        )
        .await;
        match answer {
            Ok(Ok(Response::Ok(StepDownAck { success: true }))) => Asked::Yes,
            Ok(Ok(Response::Ok(_))) => Asked::Refused("the server did not say it stepped down".into()),
            // Another starter moved it there first: the leader that answered is `to` itself.
            Ok(Ok(Response::Err { error })) if error.to_string().contains("already leader") => {
                Asked::Skipped(format!("{to} leads it already"))
            }
            Ok(Ok(Response::Err { error })) => Asked::Refused(error.to_string()),
            Ok(Err(e)) => Asked::Refused(e.to_string()),
            Err(_) => Asked::Refused(format!("no answer within {} s", STEPDOWN_PATIENCE.as_secs())),
        }
    }
}

/// What became of one stepdown request.
enum Asked {
    /// The leader said it steps down.
    Yes,
    /// Not asked, or nothing to do.
    Skipped(String),
    /// Refused or unanswered, with why.
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::ReplicaState;

    fn stream(name: &str, leader: &str, followers: &[&str]) -> StreamStatus {
        StreamStatus {
            stream: name.into(),
            replicas: followers.len() + 1,
            leader: leader.into(),
            followers: followers
                .iter()
                .map(|f| ReplicaState {
                    server: f.to_string(),
                    current: true,
                    lag: 0,
                    offline: false,
                })
                .collect(),
            messages: 0,
        }
    }

    fn after(status: &[StreamStatus], moves: &[LeaderMove]) -> BTreeMap<String, usize> {
        let mut load = leaders_per_node(status);
        for m in moves {
            *load.get_mut(&m.from).unwrap() -= 1;
            *load.get_mut(&m.to).unwrap() += 1;
        }
        load
    }

    #[test]
    fn ten_streams_on_one_node_of_three_end_four_three_three() {
        let status: Vec<_> = (0..10).map(|i| stream(&format!("S{i}"), "n1", &["n2", "n3"])).collect();
        let moves = plan_spread(&status);
        assert_eq!(moves.len(), 6, "{moves:?}");
        let load = after(&status, &moves);
        assert!(load.values().all(|&n| n <= 4), "{load:?}");
        assert_eq!(load.values().sum::<usize>(), 10);
        assert!(
            moves
                .iter()
                .all(|m| m.from == "n1" && m.outcome == MoveOutcome::Planned)
        );
    }

    #[test]
    fn a_spread_cluster_is_left_alone() {
        let nodes = ["n1", "n2", "n3"];
        let status: Vec<_> = (0..10)
            .map(|i| {
                let leader = nodes[i % 3];
                let followers: Vec<&str> = nodes.iter().copied().filter(|n| *n != leader).collect();
                stream(&format!("S{i}"), leader, &followers)
            })
            .collect();
        assert!(plan_spread(&status).is_empty());
        // And once a plan is carried out, planning again asks nothing.
        let skewed: Vec<_> = (0..10).map(|i| stream(&format!("S{i}"), "n2", &["n1", "n3"])).collect();
        let moves = plan_spread(&skewed);
        let carried_out: Vec<_> = skewed
            .iter()
            .map(|s| match moves.iter().find(|m| m.stream == s.stream) {
                Some(m) => {
                    let followers: Vec<&str> = nodes.iter().copied().filter(|n| *n != m.to).collect();
                    stream(&s.stream, &m.to, &followers)
                }
                None => s.clone(),
            })
            .collect();
        assert!(
            plan_spread(&carried_out).is_empty(),
            "{:?}",
            leaders_per_node(&carried_out)
        );
    }

    #[test]
    fn never_onto_an_offline_or_lagging_follower_nor_a_lone_server() {
        let mut status: Vec<_> = (0..6).map(|i| stream(&format!("S{i}"), "n1", &["n2", "n3"])).collect();
        for s in &mut status {
            s.followers[1].offline = true; // n3 is down
        }
        status[0].followers[0].current = false; // n2 is behind on S0
        let moves = plan_spread(&status);
        assert!(moves.iter().all(|m| m.to == "n2" && m.stream != "S0"), "{moves:?}");
        assert_eq!(moves.len(), 3, "two live nodes, share 3: {moves:?}");
        let lone: Vec<_> = (0..4).map(|i| stream(&format!("S{i}"), "n1", &[])).collect();
        assert!(plan_spread(&lone).is_empty());
        let electing = vec![stream("S0", "", &["n1", "n2"])];
        assert!(plan_spread(&electing).is_empty());
    }
}
