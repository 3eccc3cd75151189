//! A real Redis Cluster for tests: one redis-server per node on free loopback
//! ports, without persistence, joined by `redis-cli --cluster create`.
//!
//! Invariants: every method that hands the cluster back to a test (`start`,
//! `failover`, `wait_until_converged`) returns only once every live node says
//! `cluster_state:ok`, all of them agree on which live master owns which slots
//! (all 16384 covered) and which master each other live node replicates, and
//! every replica's link to its master is up. Who is master is always asked of
//! the cluster, never remembered: roles change on failover, and `redis-cli`
//! pairs replicas with masters as it likes.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use verve::window::WindowStart;

use super::eventually;
use super::redis_server::{free_port, server_command};

/// How long the cluster may take to settle after a start, a failover or a kill.
/// A killed master is replaced after the node timeout (1 s) and an election.
const SETTLE: Duration = Duration::from_secs(20);

/// The slots a Redis Cluster divides keys over.
const SLOTS: usize = 16384;

pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

struct Node {
    port: u16,
    /// `None` once killed.
    child: Option<Child>,
}

/// One line of `CLUSTER NODES`: a node as some node sees it.
struct NodeView {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// The id of the master this node replicates, for a replica.
    master_id: Option<String>,
    slots: Vec<RangeInclusive<u16>>,
}

impl NodeView {
    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// Which master port serves which slots, ordered by slot.
type SlotMap = Vec<(RangeInclusive<u16>, u16)>;

impl RedisCluster {
    /// Starts `masters` masters with `replicas_per_master` replicas each and
    /// waits until the cluster is settled.
    pub fn start(masters: usize, replicas_per_master: usize) -> RedisCluster {
        assert!(
            masters >= 3,
            "redis-cli creates clusters of 3 masters or more"
        );
        let count = masters * (1 + replicas_per_master);
        // Two ports per node: clients', and the cluster bus's. The bus would
        // default to port + 10000, which may be taken or past 65535.
        let mut ports = BTreeSet::new();
        while ports.len() < 2 * count {
            ports.insert(free_port());
        }
        let ports: Vec<u16> = ports.into_iter().collect();
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        for pair in ports.chunks(2) {
            cluster.spawn(pair[0], pair[1]);
        }
        for node in &mut cluster.nodes {
            let port = node.port;
            let child = node.child.as_mut().unwrap();
            eventually(
                Duration::from_secs(10),
                || format!("redis-server on port {port} to answer PING"),
                || {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!("redis-server on port {port} exited ({status}): port taken?");
                    }
                    let reply: String = redis::cmd("PING").query(&mut connect(port)?).ok()?;
                    Some(reply)
                },
            );
        }
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.port)),
            )
            .args(["--cluster-replicas", &replicas_per_master.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli on PATH");
        assert!(
            output.status.success(),
            "redis-cli --cluster create: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // redis-cli returns once the nodes have met, but the masters may still
        // say cluster_state:fail and the replicas may still be syncing.
        let map = cluster.wait_until_converged();
        let owners: BTreeSet<u16> = map.iter().map(|(_, port)| *port).collect();
        assert_eq!(owners.len(), masters, "slot map {map:?}");
        cluster
    }

    fn spawn(&mut self, port: u16, bus_port: u16) {
        let config = self.dir.path().join(format!("nodes-{port}.conf"));
        let child = server_command(port, self.dir.path())
            .args(["--cluster-port", &bus_port.to_string()])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(config)
            .args(["--cluster-node-timeout", "1000"])
            // A replica's first sync would otherwise wait 5 s for others to join it.
            .args(["--repl-diskless-sync-delay", "0"])
            .spawn()
            .expect("redis-server on PATH (scripts/test.sh installs it)");
        self.nodes.push(Node {
            port,
            child: Some(child),
        });
    }

    /// The seed list for `VERVE_REDIS_URL` in cluster mode: every live node.
    pub fn urls(&self) -> String {
        self.alive()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The ports of the masters that serve slots now, ascending.
    pub fn masters(&self) -> Vec<u16> {
        let owners: BTreeSet<u16> = self.slot_map().into_iter().map(|(_, p)| p).collect();
        owners.into_iter().collect()
    }

    /// The port of the master that serves `key` now.
    pub fn owner_of_key(&self, key: &str) -> u16 {
        let slot = keyslot(&mut connection(self.any_alive()), key);
        owner(&self.slot_map(), slot)
    }

    /// The port of a live replica of `master`.
    pub fn replica_of(&self, master: u16) -> u16 {
        let view = self.view_of(self.any_alive());
        let id = &view
            .iter()
            .find(|n| n.port == master && n.has("master"))
            .unwrap_or_else(|| panic!("{master} is no master"))
            .id;
        view.iter()
            .find(|n| n.master_id.as_ref() == Some(id) && !n.has("fail") && self.is_alive(n.port))
            .unwrap_or_else(|| panic!("{master} has no live replica"))
            .port
    }

    /// For each master (every one listed, even with nothing), how many ids of
    /// `window` it holds: the sizes of the shard sets of `window` split over `shards`,
    /// that it serves, each asked of its own master.
    pub fn scard_by_master(&self, window: WindowStart, shards: usize) -> BTreeMap<u16, u64> {
        let any = self.any_alive();
        let map = slot_map(&self.view_of(any));
        let mut slots = connection(any);
        let mut connections: BTreeMap<u16, redis::Connection> = map
            .iter()
            .map(|(_, port)| (*port, connection(*port)))
            .collect();
        let mut sizes: BTreeMap<u16, u64> = map.iter().map(|(_, port)| (*port, 0)).collect();
        for shard in window_shards(window, shards) {
            let port = owner(&map, keyslot(&mut slots, &shard));
            let connection = connections.get_mut(&port).unwrap();
            for set in shard_sets(connection, &shard) {
                *sizes.get_mut(&port).unwrap() += scard(connection, &set);
            }
        }
        sizes
    }

    /// How many ids of `window` the node on `port` has itself, master or
    /// replica: the sizes of the shard sets in its master's slots, read on it.
    /// A replica behind its master has fewer.
    pub fn scard_on(&self, port: u16, window: WindowStart, shards: usize) -> u64 {
        let view = self.view_of(port);
        let me = view.iter().find(|n| n.has("myself")).unwrap();
        let master = match &me.master_id {
            Some(id) => view.iter().find(|n| &n.id == id).unwrap().port,
            None => port,
        };
        let map = slot_map(&view);
        let mut connection = connection(port);
        // Without it a replica redirects reads to its master.
        let _: () = redis::cmd("READONLY").query(&mut connection).unwrap();
        let mut ids = 0;
        for shard in window_shards(window, shards) {
            if owner(&map, keyslot(&mut connection, &shard)) == master {
                for set in shard_sets(&mut connection, &shard) {
                    ids += scard(&mut connection, &set);
                }
            }
        }
        ids
    }

    /// From now on the replica on `port` gets nothing more from its master: it
    /// drops its link and cannot log in again (a `masterauth` the master
    /// refuses), yet stays a replica that may take over. What its master takes
    /// from here on dies with the master, as writes an asynchronous replica had
    /// not yet received. The cluster does not count as settled again until the
    /// replica has taken over: it may, for 20 s after the cut (ten node
    /// timeouts and the 10 s replication ping period).
    pub fn cut_off_replica(&self, port: u16) {
        let mut replica = connection(port);
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("masterauth")
            .arg("not-the-masters-password")
            .query(&mut replica)
            .unwrap();
        let _: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("master")
            .query(&mut replica)
            .unwrap();
        eventually(
            Duration::from_secs(5),
            || format!("replica {port} to lose its master"),
            || {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut replica)
                    .unwrap();
                info.lines()
                    .any(|l| l.trim() == "master_link_status:down")
                    .then_some(())
            },
        );
    }

    /// The shards of `window` that hold ids, on any master: the keys
    /// `verve:{W/…}` their sets are named from, for every set key
    /// (`verve:{W/…}`, or `verve:{W/…}:<sets>/<set>`; not the shards'
    /// bookkeeping, `:delivered` and `:rounds`).
    pub fn shard_keys(&self, window: WindowStart) -> BTreeSet<String> {
        let pattern = format!("verve:{{{window}/*}}*");
        let mut shards = BTreeSet::new();
        for port in self.masters() {
            let found: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query(&mut connection(port))
                .unwrap();
            for key in found {
                let (shard, rest) = key.split_at(key.find('}').unwrap() + 1);
                if !rest.ends_with(":delivered") && !rest.ends_with(":rounds") {
                    shards.insert(shard.to_owned());
                }
            }
        }
        shards
    }

    /// Whether `key` exists, asked of its master.
    pub fn exists(&self, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query(&mut connection(self.owner_of_key(key)))
            .unwrap()
    }

    /// A field of `window`'s published record, `verve:{W}:record`.
    pub fn record_field(&self, window: WindowStart, field: &str) -> Option<String> {
        let key = format!("verve:{{{window}}}:record");
        redis::cmd("HGET")
            .arg(&key)
            .arg(field)
            .query(&mut connection(self.owner_of_key(&key)))
            .unwrap()
    }

    /// Has a replica of `master` take its place (`CLUSTER FAILOVER`, which first
    /// lets the replica catch up, so nothing written is lost), waits until the
    /// cluster has settled with the replica as master and `master` replicating
    /// it, and returns the replica's port.
    pub fn failover(&self, master: u16) -> u16 {
        let replica = self.replica_of(master);
        let reply: String = redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query(&mut connection(replica))
            .unwrap();
        assert_eq!(reply, "OK");
        // A manual failover that cannot finish is dropped by Redis after 5 s
        // without a word; the deadline here is what reports it.
        let last = RefCell::new(String::new());
        eventually(
            SETTLE,
            || format!("{replica} to replace master {master}: {}", last.borrow()),
            || match self.converged() {
                Ok(map) => {
                    let owners: BTreeSet<u16> = map.iter().map(|(_, p)| *p).collect();
                    let done = owners.contains(&replica) && !owners.contains(&master);
                    *last.borrow_mut() = format!("settled on {map:?}");
                    done.then_some(())
                }
                Err(why) => {
                    *last.borrow_mut() = why;
                    None
                }
            },
        );
        replica
    }

    /// Kills the node on `port` at once (SIGKILL), as a crash would: writes its
    /// replicas had not received yet are gone.
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the cluster has settled (see the module's invariants) and
    /// returns the slot map all live nodes agree on.
    pub fn wait_until_converged(&self) -> SlotMap {
        let last = RefCell::new(String::new());
        eventually(
            SETTLE,
            || format!("the cluster to settle: {}", last.borrow()),
            || {
                self.converged()
                    .map_err(|why| *last.borrow_mut() = why)
                    .ok()
            },
        )
    }

    /// The agreed slot map, or why there is none yet.
    fn converged(&self) -> Result<SlotMap, String> {
        let mut agreed: Option<(SlotMap, BTreeMap<u16, u16>)> = None;
        for port in self.alive() {
            let mut connection = connect(port).ok_or(format!("{port} unreachable"))?;
            let info: String = query(&mut connection, redis::cmd("CLUSTER").arg("INFO"), port)?;
            if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                return Err(format!("{port} says the cluster is not ok"));
            }
            let text: String = query(&mut connection, redis::cmd("CLUSTER").arg("NODES"), port)?;
            let view = parse_nodes(&text);
            let map = slot_map(&view);
            let covered: usize = map.iter().map(|(slots, _)| slots.len()).sum();
            if covered != SLOTS {
                return Err(format!("{port} sees {covered} slots served: {map:?}"));
            }
            if let Some(dead) = map.iter().find(|(_, p)| !self.is_alive(*p)) {
                return Err(format!("{port} has dead {} serving slots", dead.1));
            }
            // A demoted master drops its slots before it turns replica: the
            // roles of all live nodes must agree too, not just the slots.
            let mut replicas = BTreeMap::new();
            for node in view.iter().filter(|n| self.is_alive(n.port)) {
                if map.iter().any(|(_, owner)| *owner == node.port) {
                    continue;
                }
                let master = view
                    .iter()
                    .find(|m| Some(&m.id) == node.master_id.as_ref())
                    .filter(|_| node.has("slave"))
                    .ok_or(format!(
                        "{port} sees {} neither serve nor replicate",
                        node.port
                    ))?;
                replicas.insert(node.port, master.port);
            }
            if view.iter().filter(|n| self.is_alive(n.port)).count() != self.alive().count() {
                return Err(format!("{port} does not know every live node yet"));
            }
            let topology = (map, replicas);
            match &agreed {
                Some(agreed) if *agreed != topology => {
                    return Err(format!("{port} sees {topology:?}, others {agreed:?}"))
                }
                Some(_) => {}
                None => agreed = Some(topology),
            }
            let me = view.iter().find(|n| n.has("myself")).unwrap();
            if me.has("slave") {
                let info: String =
                    query(&mut connection, redis::cmd("INFO").arg("replication"), port)?;
                if !info.lines().any(|l| l.trim() == "master_link_status:up") {
                    return Err(format!("replica {port} not yet in sync with its master"));
                }
            }
        }
        agreed
            .map(|(map, _)| map)
            .ok_or_else(|| "no live node".into())
    }

    /// The slot map as one live node sees it.
    fn slot_map(&self) -> SlotMap {
        slot_map(&self.view_of(self.any_alive()))
    }

    fn view_of(&self, port: u16) -> Vec<NodeView> {
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut connection(port))
            .unwrap();
        parse_nodes(&text)
    }

    fn alive(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
    }

    fn is_alive(&self, port: u16) -> bool {
        self.alive().any(|p| p == port)
    }

    fn any_alive(&self) -> u16 {
        self.alive().next().expect("a live node")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A plain (not cluster-aware) connection to one node, if it answers.
fn connect(port: u16) -> Option<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    client.get_connection().ok()
}

fn connection(port: u16) -> redis::Connection {
    connect(port).unwrap_or_else(|| panic!("no connection to node {port}"))
}

fn query<T: redis::FromRedisValue>(
    connection: &mut redis::Connection,
    command: &redis::Cmd,
    port: u16,
) -> Result<T, String> {
    command
        .query(connection)
        .map_err(|e| format!("{port}: {e}"))
}

/// The keys of `window`'s shards, which their sets are named from.
fn window_shards(window: WindowStart, shards: usize) -> Vec<String> {
    verve::store::window_shards("verve", window, shards)
}

/// The keys of a shard's sets, as many as its sentinel records, read on
/// `connection` (the shard's master, or a replica of it).
fn shard_sets(connection: &mut redis::Connection, shard: &str) -> Vec<String> {
    let sets: Option<u32> = redis::cmd("HGET")
        .arg(format!("{shard}:rounds"))
        .arg("sets")
        .query(connection)
        .unwrap();
    verve::store::window_sets(shard, sets.unwrap_or(1))
}

fn keyslot(connection: &mut redis::Connection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(connection)
        .unwrap()
}

fn scard(connection: &mut redis::Connection, key: &str) -> u64 {
    redis::cmd("SCARD")
        .arg(key)
        .query(connection)
        .unwrap_or_else(|e| panic!("SCARD {key}: {e}"))
}

/// Who serves `slot` in `map`.
fn owner(map: &SlotMap, slot: u16) -> u16 {
    map.iter()
        .find(|(slots, _)| slots.contains(&slot))
        .unwrap_or_else(|| panic!("nobody serves slot {slot}: {map:?}"))
        .1
}

/// The masters that serve slots in `view`, not counting failed ones.
fn slot_map(view: &[NodeView]) -> SlotMap {
    let mut map: SlotMap = view
        .iter()
        .filter(|n| n.has("master") && !n.has("fail"))
        .flat_map(|n| n.slots.iter().map(|slots| (slots.clone(), n.port)))
        .collect();
    map.sort_by_key(|(slots, _)| *slots.start());
    map
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@bus[,host]> <flags> <master> <ping>
/// <pong> <epoch> <link> <slot>...`, where a slot is `n` or `a-b`, or a
/// bracketed slot in migration, which is left out.
fn parse_nodes(text: &str) -> Vec<NodeView> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = fields[1].split('@').next().unwrap();
            let port = address.rsplit(':').next().unwrap().parse().unwrap();
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .map(|s| match s.split_once('-') {
                    Some((a, b)) => a.parse().unwrap()..=b.parse().unwrap(),
                    None => {
                        let n = s.parse().unwrap();
                        n..=n
                    }
                })
                .collect();
            NodeView {
                id: fields[0].to_owned(),
                port,
                flags: fields[2].split(',').map(str::to_owned).collect(),
                master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
                slots,
            }
        })
        .collect()
}
