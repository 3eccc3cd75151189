//! How verve reaches Redis: one server, or a Redis Cluster (`VERVE_REDIS_MODE`).
//!
//! Both the store and the Redis stream sink hold a [`RedisEndpoint`] and make a
//! [`RedisLink`] from it, dropping the link after any error and making a new one.
//! Everything they send is either a single command or script (routed by its first
//! key in a cluster) or a [`RedisLink::pipeline`] of them, which a cluster splits
//! by node; nothing relies on two keys of different slots being in one call.
//!
//! In a cluster the client follows `MOVED` and `ASK` itself and sends the command
//! again: every command verve sends may be sent twice (the fleet's rounds are
//! numbered, `SADD` is idempotent). Its own retries are kept short: the caller
//! backs off and reconnects after an error, and a new link reads the slot map
//! afresh, which is how a failover that moved a master is followed.

use std::fmt;
use std::time::Duration;

use crate::config::RedisMode;
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConnection};
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::{
    Client, Cmd, Connection, ConnectionLike, ErrorKind, Pipeline, RedisResult, Script,
    ServerErrorKind, Value,
};

/// Where Redis is: what a [`RedisLink`] is made from.
#[derive(Clone)]
pub enum RedisEndpoint {
    Single(Client),
    Cluster(ClusterClient),
}

/// A live connection to Redis.
pub enum RedisLink {
    Single(Connection),
    /// Boxed: it holds a connection per node and the slot map.
    Cluster(Box<ClusterConnection>),
}

/// How often the cluster client sends a command again on its own (after `MOVED`,
/// `ASK`, `TRYAGAIN`, a dropped node connection) before the caller hears the error.
const CLUSTER_RETRIES: u32 = 3;

/// A Redis URL (or list of seed nodes) that cannot be used, with the variable
/// it came from.
#[derive(Debug)]
pub struct EndpointError {
    variable: &'static str,
    urls: String,
    problem: EndpointProblem,
}

#[derive(Debug)]
enum EndpointProblem {
    /// redis-rs refused it.
    Invalid(redis::RedisError),
    /// A cluster's list of seed nodes with an empty entry.
    EmptySeed,
}

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (variable, urls) = (self.variable, &self.urls);
        match &self.problem {
            EndpointProblem::Invalid(e) => write!(f, "invalid {variable} '{urls}': {e}"),
            EndpointProblem::EmptySeed => write!(
                f,
                "invalid {variable} '{urls}': in cluster mode it lists seed nodes, \
                 redis://host:port,redis://host:port,… with no empty entry"
            ),
        }
    }
}

impl std::error::Error for EndpointError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.problem {
            EndpointProblem::Invalid(e) => Some(e),
            EndpointProblem::EmptySeed => None,
        }
    }
}

impl RedisEndpoint {
    /// Checks `urls` (`variable` names where they came from, for the error): one
    /// URL in single mode, a comma-separated list of seed nodes in cluster mode.
    pub fn open(
        mode: RedisMode,
        urls: &str,
        variable: &'static str,
        timeout: Duration,
    ) -> Result<RedisEndpoint, EndpointError> {
        let error = |problem| EndpointError {
            variable,
            urls: urls.to_owned(),
            problem,
        };
        let invalid = |e| error(EndpointProblem::Invalid(e));
        match mode {
            RedisMode::Single => Client::open(urls)
                .map(RedisEndpoint::Single)
                .map_err(invalid),
            RedisMode::Cluster => {
                let seeds: Vec<&str> = urls.split(',').map(str::trim).collect();
                if seeds.iter().any(|seed| seed.is_empty()) {
                    return Err(error(EndpointProblem::EmptySeed));
                }
                ClusterClientBuilder::new(seeds)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(CLUSTER_RETRIES)
                    .min_retry_wait(10)
                    .max_retry_wait(timeout.as_millis().max(20) as u64)
                    .build()
                    .map(RedisEndpoint::Cluster)
                    .map_err(invalid)
            }
        }
    }

    /// Connects, with `timeout` on the connect and on every read and write (a
    /// cluster's connects keep the timeout the endpoint was opened with).
    pub fn connect(&self, timeout: Duration) -> RedisResult<RedisLink> {
        let mut link = match self {
            RedisEndpoint::Single(client) => {
                RedisLink::Single(client.get_connection_with_timeout(timeout)?)
            }
            RedisEndpoint::Cluster(client) => {
                RedisLink::Cluster(Box::new(client.get_connection()?))
            }
        };
        link.set_timeout(timeout)?;
        Ok(link)
    }
}

impl RedisLink {
    /// Bounds every read and write from now on by `timeout`.
    pub fn set_timeout(&mut self, timeout: Duration) -> RedisResult<()> {
        match self {
            RedisLink::Single(connection) => {
                connection.set_read_timeout(Some(timeout))?;
                connection.set_write_timeout(Some(timeout))
            }
            RedisLink::Cluster(connection) => {
                connection.set_read_timeout(Some(timeout))?;
                connection.set_write_timeout(Some(timeout))
            }
        }
    }

    /// For a single command or script: a cluster routes it by its first key.
    pub fn connection(&mut self) -> &mut dyn ConnectionLike {
        match self {
            RedisLink::Single(connection) => connection,
            RedisLink::Cluster(connection) => connection.as_mut(),
        }
    }

    /// Sends `commands` in one round trip per node and returns their answers in
    /// order. `atomic` (one server only) makes them one transaction (`MULTI`);
    /// otherwise each command (a script, say) stands alone. If a node does not
    /// know a script yet (it just started, or was just promoted), `scripts` (those
    /// the commands call by hash) are loaded and the same pipeline is sent again:
    /// every command in it must be safe to run twice.
    pub fn pipeline(
        &mut self,
        commands: Vec<Cmd>,
        atomic: bool,
        scripts: &[&Script],
    ) -> RedisResult<Vec<Value>> {
        match self {
            RedisLink::Single(connection) => {
                let mut pipe = redis::pipe();
                if atomic {
                    pipe.atomic();
                }
                for command in commands {
                    pipe.add_command(command);
                }
                teaching_scripts(connection, scripts, |c| query_to_first_failure(c, &pipe))
            }
            RedisLink::Cluster(connection) => {
                debug_assert!(!atomic, "a cluster has no transaction across nodes");
                let mut pipe = redis::cluster::cluster_pipe();
                for command in commands {
                    pipe.add_command(command);
                }
                teaching_scripts(connection.as_mut(), scripts, |c| pipe.query(c))
            }
        }
    }

    /// Sends `command` to the one server, or to every master of the cluster, and
    /// returns each one's answer.
    pub fn on_every_master(&mut self, command: &Cmd) -> RedisResult<Vec<Value>> {
        match self {
            RedisLink::Single(connection) => Ok(vec![command.query(connection)?]),
            RedisLink::Cluster(connection) => {
                let every_master =
                    RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                match connection.route_command(command, every_master)? {
                    Value::Map(answers) => {
                        Ok(answers.into_iter().map(|(_, answer)| answer).collect())
                    }
                    answer => Ok(vec![answer]),
                }
            }
        }
    }
}

/// Runs `pipe` on one server and reads its answers, giving up at the first
/// that does not come: redis-rs's own `query` reads on past a timeout, so that
/// a round of thousands of `SADD`s to a stalled server would wait a timeout
/// per command before it failed. The connection is out of step after a failure;
/// the caller drops it. An answer that is an error (a script not loaded, say)
/// is the pipeline's error.
fn query_to_first_failure(connection: &mut Connection, pipe: &Pipeline) -> RedisResult<Vec<Value>> {
    connection.send_packed_command(&pipe.get_packed_pipeline())?;
    let answers = match pipe.is_transaction() {
        // `MULTI`'s OK, a `QUEUED` per command, then `EXEC`'s answers.
        true => pipe.len() + 2,
        false => pipe.len(),
    };
    let mut values = Vec::with_capacity(answers);
    for _ in 0..answers {
        values.push(connection.recv_response()?);
    }
    let values = match pipe.is_transaction() {
        true => match values.pop() {
            Some(Value::Array(executed)) => {
                // A command refused while queued aborted the transaction.
                if let Some(refused) = values
                    .into_iter()
                    .find(|v| matches!(v, Value::ServerError(_)))
                {
                    refused.extract_error()?;
                }
                executed
            }
            Some(Value::ServerError(error)) => return Err(error.into()),
            _ => {
                return Err((
                    ErrorKind::UnexpectedReturnType,
                    "a transaction without its answers",
                )
                    .into())
            }
        },
        false => values,
    };
    for value in &values {
        if let Value::ServerError(error) = value {
            return Err(error.clone().into());
        }
    }
    Ok(values)
}

/// Runs `send`; if a node answered `NOSCRIPT`, loads `scripts` (on every master,
/// in a cluster) and runs it once more.
fn teaching_scripts<C: ConnectionLike>(
    connection: &mut C,
    scripts: &[&Script],
    mut send: impl FnMut(&mut C) -> RedisResult<Vec<Value>>,
) -> RedisResult<Vec<Value>> {
    match send(connection) {
        Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            for script in scripts {
                script.load(connection)?;
            }
            send(connection)
        }
        result => result,
    }
}
