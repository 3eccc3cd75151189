//! verve counts the distinct request ids it receives in each time window.
//!
//! How the parts fit: [`server`] runs one thread per worker, each with its own
//! monoio runtime and SO_REUSEPORT listener. A worker parses `GET
//! /api/verve/accept?id=…`, stamps the id with the [`window`] of its arrival, and
//! appends it to its [`batch`]. Sealed batches cross one bounded flume channel to
//! the single [`aggregator`] thread, which keeps an `scc::HashSet` of ids per open
//! window, and tells the dedup [`store`] which ids were new to this instance. Once
//! every worker has passed a window's end, the aggregator swaps the set out and
//! hands it to the store, which settles the count (the set's size, or `SCARD` of a Redis set
//! shared by several instances) and [`report`]s it to every [`sink`] (the count log)
//! and to the endpoints requests named, through the [`callback`] dispatcher.
//! [`admin`] serves `/metrics` and `/healthz` on an address of its own.
//! [`service`] starts and stops all of it; [`config`] is every knob.
//!
//! Nothing on a worker blocks on anything but its own client, and nothing between
//! a worker and the aggregator is unbounded: when the channel is full, new ids are
//! refused with 503 while the ids already accepted wait their turn.

pub mod admin;
pub mod admission;
pub mod aggregator;
pub mod backoff;
pub mod batch;
pub mod callback;
pub mod callback_policy;
pub mod config;
pub mod error;
pub mod metrics;
pub mod record;
pub mod redis_link;
pub mod report;
pub mod server;
pub mod service;
pub mod sink;
pub mod store;
pub mod window;

pub use config::Config;
pub use error::StartError;
pub use service::Verve;
