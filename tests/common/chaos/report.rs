//! What a chaos run tells: the seed and schedule (to replay it), the faults as
//! they happened, per window the truth and the topic's revisions, the ids lost
//! and which kill allowed them, every broken rule, and one summary line that
//! `scripts/chaos.sh` collects. A copy, with every run's stderr, goes to
//! `target/chaos/seed-<seed>/`.

use std::fmt::{self, Write as _};
use std::path::PathBuf;
use std::time::SystemTime;

use super::checker::{Published, Verdict};
use super::fleet::Fleet;
use super::schedule::Fault;
use super::truth::{Kill, Truth};

pub struct Report {
    pub seed: u64,
    pub secs: u64,
    pub schedule: Vec<Fault>,
    /// The faults as they happened.
    pub events: Vec<String>,
    pub kills: Vec<Kill>,
    pub origin: SystemTime,
    pub truth: Truth,
    pub verdict: Verdict,
    /// The topic reached the truth before the deadline.
    pub settled: bool,
    pub records: Vec<Published>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.verdict.failures.is_empty()
    }

    /// Windows with at least one certain `ok` id.
    pub fn windows(&self) -> usize {
        self.truth
            .windows
            .values()
            .filter(|w| w.lower() > 0)
            .count()
    }

    /// The faults that ran (not skipped for lack of time).
    pub fn faults(&self) -> usize {
        self.events.iter().filter(|e| e.contains(": ran ")).count()
    }

    /// One line: `chaos seed=… result=pass|FAIL …`, then one line per loss.
    pub fn summary(&self) -> String {
        let lost: u64 = self.verdict.losses.iter().map(|l| l.lost).sum();
        let allowed: u64 = self.truth.windows.values().map(|w| w.allowed()).sum();
        let mut text = format!(
            "chaos seed={} secs={} result={} windows={} faults={} kills={} ok_ids={} \
             straddling={} unanswered={} allowed={allowed} lost={lost} failures={}",
            self.seed,
            self.secs,
            if self.passed() { "pass" } else { "FAIL" },
            self.windows(),
            self.faults(),
            self.kills.len(),
            self.truth.oks,
            self.truth.straddling,
            self.truth.unanswered,
            self.verdict.failures.len(),
        );
        for loss in &self.verdict.losses {
            let kills: Vec<String> = loss
                .kills
                .iter()
                .map(|&k| {
                    let kill = &self.kills[k];
                    let oldest = kill.undelivered.last().map_or(0, |u| u.age.as_millis());
                    format!(
                        "{} killed at +{:.3}s ({} of its ok ids not in Redis then, answered \
                         at most {oldest} ms before)",
                        kill.name,
                        self.since(kill.at),
                        kill.undelivered.len()
                    )
                })
                .collect();
            let _ = write!(
                text,
                "\nchaos seed={} lost window={} ids={} of allowed {}: answered only by {} \
                 in its last moments",
                self.seed,
                loss.window,
                loss.lost,
                loss.allowed,
                kills.join(", ")
            );
        }
        text
    }

    fn since(&self, t: SystemTime) -> f64 {
        t.duration_since(self.origin)
            .unwrap_or_default()
            .as_secs_f64()
    }

    /// Writes the report, every record and every run's stderr under
    /// `target/chaos/seed-<seed>/`.
    pub fn save(&self, fleet: &Fleet) {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        let dir = target.join("chaos").join(format!("seed-{}", self.seed));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("report.txt"), self.to_string()).unwrap();
        let records: String = self.records.iter().map(|r| format!("{r:?}\n")).collect();
        std::fs::write(dir.join("records.txt"), records).unwrap();
        for (run, verve) in fleet.runs() {
            std::fs::write(dir.join(format!("{run}.stderr")), verve.stderr_text()).unwrap();
        }
        eprintln!("chaos: report and stderr of every run in {}", dir.display());
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chaos seed={} secs={} (replay: scripts/chaos.sh {} {})",
            self.seed, self.secs, self.seed, self.secs
        )?;
        writeln!(f, "schedule:")?;
        for fault in &self.schedule {
            writeln!(f, "  {fault}")?;
        }
        writeln!(f, "as it happened:")?;
        for event in &self.events {
            writeln!(f, "  {event}")?;
        }
        for kill in &self.kills {
            let ms: Vec<String> = kill
                .undelivered
                .iter()
                .map(|u| u.age.as_millis().to_string())
                .collect();
            writeln!(
                f,
                "  {} killed at +{:.3}s: {} ok ids not in Redis just after, answered [{}] ms before",
                kill.name,
                self.since(kill.at),
                ms.len(),
                ms.join(", ")
            )?;
        }
        if !self.settled {
            writeln!(f, "the topic never reached the truth within the deadline")?;
        }
        writeln!(
            f,
            "windows (certain ids, maybe ids, allowed to be missing; topic: revision/count/complete):"
        )?;
        for (window, truth) in &self.truth.windows {
            let topic = self.verdict.topic.get(window).cloned().unwrap_or_default();
            let topic: Vec<String> = topic
                .iter()
                .map(|(r, c, complete)| format!("{r}/{c}/{complete}"))
                .collect();
            writeln!(
                f,
                "  {window}: {} {} {}; {}",
                truth.lower(),
                truth.upper() - truth.lower(),
                truth.allowed(),
                topic.join(" ")
            )?;
        }
        for failure in &self.verdict.failures {
            writeln!(f, "FAILED: {failure}")?;
        }
        write!(f, "{}", self.summary())
    }
}
