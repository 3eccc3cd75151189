//! The threads that call endpoints, with ureq.
//!
//! `VERVE_CALLBACK_CONCURRENCY` threads take jobs from one bounded queue; each job
//! is one HTTP call (POST with the count record and `final` as a JSON body, or GET
//! with `count=N`), retried after a
//! transport error or a 5xx answer with doubling backoff up to a ceiling, never
//! after a 4xx nor after a refusal by the policy. Every
//! outcome is logged with the endpoint, the status or error, the attempts and the
//! latency. Names are resolved through the [`CallbackPolicy`], so a refused address
//! is never connected to, whatever the name.

use std::net::IpAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};
use ureq::Agent;

use super::{
    CallbackCounters, CallbackJob, CallbackOutcome, CallbackPolicy, Callbacks, Coalescer, Refusal,
};
use super::{CallbackMethod, CallbackTiming};
use crate::backoff::Backoff;
use crate::record::CountRecord;

/// The first retry waits this long; each further one twice as long as the last,
/// up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait before a retry. The waiting thread is one of the few callers,
/// so a dead endpoint must not keep it for long: with the most retries (10), the
/// waits add up to 13 s instead of the 102 s that doubling alone would reach.
/// Two seconds still spans a receiver's restart or a balancer's failover, which
/// is what the later retries are there for.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Response bodies are read (so connections can be reused) up to this size.
const MAX_RESPONSE_BODY: u64 = 64 * 1024;

/// The running callback threads.
pub struct Dispatcher {
    threads: Vec<JoinHandle<()>>,
    /// The jobs' queue, to account for what is left of it at shutdown.
    queue: flume::Receiver<CallbackJob>,
    counters: CallbackCounters,
}

/// What every dispatcher thread needs.
#[derive(Clone)]
struct Caller {
    agent: Agent,
    method: CallbackMethod,
    retries: u32,
    coalescer: Option<Coalescer>,
    counters: CallbackCounters,
}

/// How the dispatcher calls endpoints (`VERVE_CALLBACK_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatcherSettings {
    /// Calls that may wait for a thread; more are dropped and counted.
    pub queue: usize,
    pub timing: CallbackTiming,
    pub method: CallbackMethod,
    pub connect_timeout: Duration,
    /// The whole call's limit, connecting included.
    pub timeout: Duration,
    /// Retries of a call that failed or got a 5xx.
    pub retries: u32,
    /// Threads making calls.
    pub concurrency: usize,
}

impl Dispatcher {
    /// Starts the threads; the returned [`Callbacks`] feeds them. The threads end
    /// once `Callbacks` is dropped and the queue is empty.
    pub fn start(
        settings: &DispatcherSettings,
        policy: CallbackPolicy,
        counters: CallbackCounters,
    ) -> std::io::Result<(Callbacks, Dispatcher)> {
        let (jobs, queue) = flume::bounded(settings.queue);
        let coalescer = (settings.timing == CallbackTiming::Immediate).then(Coalescer::default);
        let agent_config = Agent::config_builder()
            .timeout_connect(Some(settings.connect_timeout))
            .timeout_global(Some(settings.timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .user_agent(concat!("verve/", env!("CARGO_PKG_VERSION")))
            .build();
        let resolver = PolicyResolver {
            policy: Arc::new(policy),
            inner: DefaultResolver::default(),
        };
        let caller = Caller {
            agent: Agent::with_parts(agent_config, DefaultConnector::default(), resolver),
            method: settings.method,
            retries: settings.retries,
            coalescer: coalescer.clone(),
            counters: counters.clone(),
        };
        let mut threads = Vec::new();
        for index in 0..settings.concurrency {
            let (queue, caller) = (queue.clone(), caller.clone());
            let thread = std::thread::Builder::new()
                .name(format!("verve-callback-{index}"))
                .spawn(move || {
                    for job in queue.iter() {
                        caller.run(job);
                    }
                })?;
            threads.push(thread);
        }
        let dispatcher = Dispatcher {
            threads,
            queue,
            counters: counters.clone(),
        };
        Ok((Callbacks::new(jobs, coalescer, counters), dispatcher))
    }

    /// Waits for the queued and in-flight calls to finish, at most until `deadline`
    /// (calls still running then are left to end with the process). Call it after
    /// every `Callbacks` is gone.
    pub fn finish(self, deadline: Instant) {
        for thread in self.threads {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
        let left = self.queue.drain().count();
        if left > 0 {
            self.counters
                .record_many(CallbackOutcome::Dropped, left as u64);
            tracing::warn!(
                callbacks = left,
                "callbacks still queued at shutdown were not made"
            );
        }
    }
}

impl Caller {
    /// Makes the call, then any coalesced call that waited behind it.
    fn run(&self, mut job: CallbackJob) {
        loop {
            self.call(&job);
            match self.coalescer.as_ref().and_then(|c| c.release(&job)) {
                Some(next) => job = next,
                None => return,
            }
        }
    }

    fn call(&self, job: &CallbackJob) {
        let started = Instant::now();
        let mut waits = backoff();
        for attempt in 1..=self.retries + 1 {
            let outcome = self.send(job);
            let retry = attempt <= self.retries
                && match &outcome {
                    Ok(status) => *status >= 500,
                    Err(ureq::Error::Other(e)) if e.is::<Refusal>() => false,
                    Err(_) => true,
                };
            let latency_ms = started.elapsed().as_millis() as u64;
            match &outcome {
                Ok(status) if !retry => tracing::info!(
                    endpoint = %job.endpoint,
                    window_start = %job.record.window_start,
                    unique_requests = job.record.unique_requests,
                    status,
                    attempts = attempt,
                    latency_ms,
                    "callback"
                ),
                Err(error) if !retry => tracing::warn!(
                    endpoint = %job.endpoint,
                    window_start = %job.record.window_start,
                    unique_requests = job.record.unique_requests,
                    %error,
                    attempts = attempt,
                    latency_ms,
                    "callback failed"
                ),
                _ => {
                    tracing::debug!(endpoint = %job.endpoint, attempt, ?outcome, "callback will be retried");
                    std::thread::sleep(waits.next_wait());
                    continue;
                }
            }
            self.counters.record(match outcome {
                Ok(status) => CallbackOutcome::Status(status),
                Err(_) => CallbackOutcome::Error,
            });
            return;
        }
    }

    /// One attempt: the status code, or why there is none.
    fn send(&self, job: &CallbackJob) -> Result<u16, ureq::Error> {
        let mut response = match self.method {
            CallbackMethod::Post => self
                .agent
                .post(&*job.endpoint)
                .header("content-type", "application/json")
                .send(CallbackBody::of(&job.record).to_json())?,
            CallbackMethod::Get => self
                .agent
                .get(with_count(&job.endpoint, job.record.unique_requests))
                .call()?,
        };
        // Read what is there (bounded) so the connection can be reused; the body
        // itself is of no interest.
        let _ = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BODY)
            .read_to_vec();
        Ok(response.status().as_u16())
    }
}

/// The waits before a call's retries: 100 ms, doubling up to [`MAX_BACKOFF`].
fn backoff() -> Backoff {
    Backoff::new(FIRST_BACKOFF, MAX_BACKOFF)
}

/// A POST callback's body: the count record, and whether its count is final.
#[derive(Serialize)]
struct CallbackBody<'a> {
    #[serde(flatten)]
    record: &'a CountRecord,
    /// The count will not change: the window is complete and was not cut short.
    #[serde(rename = "final")]
    is_final: bool,
}

impl<'a> CallbackBody<'a> {
    fn of(record: &'a CountRecord) -> Self {
        CallbackBody {
            record,
            is_final: record.is_final(),
        }
    }

    fn to_json(&self) -> String {
        // As the record itself, plus a boolean: serializing cannot fail.
        serde_json::to_string(self).expect("a callback body serializes")
    }
}

/// `endpoint` with `count=N` added to its query, keeping the query it has and
/// leaving out any fragment (which is never sent anyway).
pub fn with_count(endpoint: &str, count: u64) -> String {
    let without_fragment = endpoint.split('#').next().unwrap_or(endpoint);
    let separator = match without_fragment.find('?') {
        None => "?",
        Some(q) if q + 1 == without_fragment.len() || without_fragment.ends_with('&') => "",
        Some(_) => "&",
    };
    format!("{without_fragment}{separator}count={count}")
}

/// Resolves names as usual, then keeps only the addresses the policy allows.
#[derive(Debug)]
struct PolicyResolver {
    policy: Arc<CallbackPolicy>,
    inner: DefaultResolver,
}

impl Resolver for PolicyResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let resolved = self.inner.resolve(uri, config, timeout)?;
        let host = uri.host().unwrap_or_default();
        let mut ips: Vec<IpAddr> = resolved.iter().map(|a| a.ip()).collect();
        self.policy
            .check_resolved(host, &mut ips)
            .map_err(|refusal| ureq::Error::Other(Box::new(refusal)))?;
        let mut allowed = self.empty();
        for addr in resolved.iter().filter(|a| ips.contains(&a.ip())) {
            allowed.push(*addr);
        }
        Ok(allowed)
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100_ms_up_to_2_s() {
        let mut waits = backoff();
        let waits: Vec<u64> = (0..8)
            .map(|_| waits.next_wait().as_millis() as u64)
            .collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        // The most retries (10) wait 13.1 s in all.
        let mut waits = backoff();
        assert_eq!(
            (0..10).map(|_| waits.next_wait()).sum::<Duration>(),
            Duration::from_millis(13_100)
        );
    }

    #[test]
    fn count_is_added_to_the_query_the_endpoint_has() {
        assert_eq!(with_count("http://h/p", 5), "http://h/p?count=5");
        assert_eq!(with_count("http://h/p?x=1", 5), "http://h/p?x=1&count=5");
        assert_eq!(with_count("http://h/p?", 5), "http://h/p?count=5");
        assert_eq!(with_count("http://h/p?x=1&", 5), "http://h/p?x=1&count=5");
        assert_eq!(
            with_count("http://h/p?x=1#frag", 5),
            "http://h/p?x=1&count=5"
        );
        assert_eq!(with_count("http://h", 0), "http://h?count=0");
    }
}
