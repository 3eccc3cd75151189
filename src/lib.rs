//! verve counts the distinct request ids it receives in each time window.
//!
//! How the parts fit: [`server`] runs one thread per worker, each with its own
//! monoio runtime and SO_REUSEPORT listener. A worker parses `GET
//! /api/verve/accept?id=…`, stamps the id with the [`window`] of its arrival, and
//! appends it to its [`batch`]. Sealed batches cross one bounded flume channel to
//! the single [`aggregator`] thread, which keeps a set of ids per open window (in
//! its own thread, or split by hash over the owner threads of its `partition`s),
//! and tells the dedup [`store`] which ids were new to this instance. Once
//! every worker has passed a window's end, the aggregator swaps the set out and
//! hands it to the store, which settles the count (the set's size, or `SCARD` of a Redis set
//! shared by several instances) and [`report`]s it to every [`sink`] (the count log)
//! and to the endpoints requests named, through the `callback` dispatcher.
//! `admin` serves `/metrics` and `/healthz` on an address of its own.
//! [`Verve`] starts and stops all of it; [`config`] is every knob.
//!
//! Nothing on a worker blocks on anything but its own client, and nothing between
//! a worker and the aggregator is unbounded: when the channel is full, new ids are
//! refused with 503 while the ids already accepted wait their turn.

// What a library user needs: the configuration, the service and its error, the
// count record and windows, and the two traits with their implementations.
pub mod config;
pub mod record;
pub mod sink;
pub mod store;
pub mod window;

// Public only for the benches and the integration tests, which drive these parts
// alone; not part of the library's interface.
#[doc(hidden)]
pub mod aggregator;
#[doc(hidden)]
pub mod batch;
#[doc(hidden)]
pub mod http;
#[doc(hidden)]
pub mod report;
#[doc(hidden)]
pub mod server;

mod admin;
mod admission;
mod backoff;
mod callback;
mod error;
mod journal;
mod metrics;
mod partition;
mod redis_link;
mod service;

pub use config::Config;
pub use error::StartError;
pub use service::Verve;
