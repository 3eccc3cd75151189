//! A seeded chaos test of the fleet: N instances on one Redis and one Kafka
//! broker, clients sending overlapping ids, and faults drawn from a seed (link
//! stalls, paused and killed instances, Redis restarted, flushed and paused),
//! then a check of every record against the ids answered `ok`.
//!
//! `rng` draws, `schedule` plans the faults, `fleet` owns the processes,
//! `clients` sends and logs, `truth` says what each window must count, `checker`
//! holds the records to it, `run` ties them together and `report` tells.

pub mod checker;
pub mod clients;
pub mod fleet;
pub mod report;
pub mod rng;
pub mod run;
pub mod schedule;
pub mod truth;

pub use run::run;
