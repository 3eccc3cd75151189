//! The rules a chaos run's records must keep, checked against the truth.
//!
//! Records come from the Kafka topic and from every run's count log. Per window:
//! - the topic has a record of every window with a certain `ok` id;
//! - the topic's highest revision counts the truth: at most `certain ∪ maybe`,
//!   at least `certain` less the ids a kill allows to be missing;
//! - no record anywhere counts more than `certain ∪ maybe`;
//! - no `complete=true` record anywhere counts less than that lower bound;
//! - one (window, revision) pair has one content everywhere (count, complete,
//!   partial, instances, scope), and a higher revision never counts less;
//! - no count log shows a revision higher than the topic's highest.
//!
//! Revisions are compared as numbers, in order: they need not start at 1 or
//! follow one another (a fleet epoch may sit in their high bits).
//!
//! A short `complete=true` record is told apart by cause: whether a run was cut
//! off from Redis (link held, it or Redis paused) across the window's start with
//! its heartbeat already lapsed (the case docs/operations.md still lists as
//! open), or not.

use std::collections::BTreeMap;
use std::time::SystemTime;

use verve::window::WindowStart;

use super::truth::Truth;

/// One record, wherever it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// `topic`, or the count log of a run (`b#1`).
    pub source: String,
    pub window: String,
    pub revision: u64,
    pub content: Content,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub count: u64,
    pub complete: bool,
    pub partial: bool,
    pub instances: u64,
    pub scope: String,
}

/// A run cut off from Redis (its link held, the process or Redis paused) whose
/// heartbeat lapsed meanwhile, until its heartbeat was renewed.
#[derive(Debug, Clone)]
pub struct Cutoff {
    pub name: String,
    pub from: SystemTime,
    /// When its heartbeat expired, by Redis's clock.
    pub lapsed: SystemTime,
    pub to: SystemTime,
}

/// Ids a window's last record is short of, within what kills allow.
#[derive(Debug, Clone)]
pub struct Loss {
    pub window: WindowStart,
    pub lost: u64,
    pub allowed: u64,
    /// The kills that allowed them, by index.
    pub kills: Vec<usize>,
}

#[derive(Debug, Default)]
pub struct Verdict {
    pub losses: Vec<Loss>,
    pub failures: Vec<String>,
    /// Per window with ids: the revisions on the topic (revision, count, complete).
    pub topic: BTreeMap<WindowStart, Vec<(u64, u64, bool)>>,
}

pub fn check(
    truth: &Truth,
    records: &[Published],
    cutoffs: &[Cutoff],
    origin: SystemTime,
) -> Verdict {
    let mut verdict = Verdict::default();
    let mut by_window: BTreeMap<&str, Vec<&Published>> = BTreeMap::new();
    for record in records {
        by_window.entry(&record.window).or_default().push(record);
    }
    let none = Default::default();
    // Windows with ids, and windows with records.
    let mut windows: BTreeMap<String, Option<WindowStart>> = truth
        .windows
        .keys()
        .map(|w| (w.to_string(), Some(*w)))
        .collect();
    for window in by_window.keys() {
        windows.entry(window.to_string()).or_insert(None);
    }
    for (key, window) in &windows {
        let truth = window.map_or(&none, |w| &truth.windows[&w]);
        let records = by_window.get(key.as_str()).cloned().unwrap_or_default();
        let (lower, upper, allowed) = (truth.lower(), truth.upper(), truth.allowed());
        let floor = lower - allowed;
        let fail = |verdict: &mut Verdict, what: String| {
            verdict.failures.push(format!(
                "{key} (certain {lower}, maybe {}, allowed {allowed}): {what}",
                upper - lower
            ))
        };
        let mut revisions: BTreeMap<u64, &Published> = BTreeMap::new();
        for record in &records {
            let c = &record.content;
            if c.count > upper {
                fail(&mut verdict, format!("counts above the truth: {record:?}"));
            }
            if c.complete && c.count < floor {
                let cause = window.map_or_else(String::new, |w| cause(w, cutoffs, origin));
                fail(
                    &mut verdict,
                    format!("complete=true, short: {record:?}{cause}"),
                );
            }
            match revisions.get(&record.revision) {
                Some(seen) if seen.content != record.content => fail(
                    &mut verdict,
                    format!("one revision, two contents: {seen:?} and {record:?}"),
                ),
                Some(_) => {}
                None => {
                    revisions.insert(record.revision, record);
                }
            }
        }
        let counts: Vec<(u64, u64)> = revisions
            .iter()
            .map(|(r, p)| (*r, p.content.count))
            .collect();
        if counts.windows(2).any(|pair| pair[1].1 < pair[0].1) {
            fail(
                &mut verdict,
                format!("a higher revision counts less: {counts:?}"),
            );
        }
        let on_topic: Vec<&&Published> = records.iter().filter(|r| r.source == "topic").collect();
        let topic_last = on_topic.iter().max_by_key(|r| r.revision);
        if let Some(w) = window {
            verdict.topic.insert(
                *w,
                on_topic
                    .iter()
                    .map(|r| (r.revision, r.content.count, r.content.complete))
                    .collect(),
            );
        }
        if let Some(last) = records.iter().max_by_key(|r| r.revision) {
            if !topic_last.is_some_and(|t| t.revision >= last.revision) {
                fail(
                    &mut verdict,
                    format!("a count log's latest revision is not on the topic: {last:?}"),
                );
            }
        }
        let Some(last) = topic_last else {
            if lower > 0 {
                fail(&mut verdict, "no record on the topic".into());
            }
            continue;
        };
        let count = last.content.count;
        if count < floor {
            fail(
                &mut verdict,
                format!("the last revision is short by more than allowed: {last:?}"),
            );
        } else if count < lower {
            verdict.losses.push(Loss {
                window: window.unwrap(),
                lost: lower - count,
                allowed,
                kills: truth.allowed.keys().copied().collect(),
            });
        }
    }
    verdict
}

/// Why a `complete=true` record of `window` may be short: a run cut off across
/// its start, with its heartbeat lapsed before it began.
fn cause(window: WindowStart, cutoffs: &[Cutoff], origin: SystemTime) -> String {
    let start = window.as_system_time();
    let since = |t: SystemTime| t.duration_since(origin).unwrap_or_default().as_secs_f64();
    let found: Vec<String> = cutoffs
        .iter()
        .filter(|c| c.lapsed <= start && c.to > start)
        .map(|c| {
            format!(
                "{} cut off from +{:.3}s to +{:.3}s, its heartbeat lapsed at +{:.3}s",
                c.name,
                since(c.from),
                since(c.to),
                since(c.lapsed)
            )
        })
        .collect();
    if found.is_empty() {
        " (no run's heartbeat had lapsed before the window began: not the open case)".into()
    } else {
        format!(
            " (the case docs/operations.md lists as open: {}, before the window began)",
            found.join("; ")
        )
    }
}
