//! `settle.lua` against its transcription ([`settle_lua`]): the real script on a
//! redis-server of its own, and the model's function, on the same window keys
//! and arguments drawn at random, must answer alike and leave the same keys. A
//! generation the script sets is Redis's clock, which the model cannot know: both
//! sides write any generation above the one drawn as `fresh`.

use super::*;

/// 1,500 cases, the same every time.
#[test]
fn the_transcription_of_settle_lua_answers_as_the_script_does() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let _server = Server(
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test.sh installs it)"),
    );
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).expect("a URL");
    let mut link = (0..100)
        .find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            client.get_connection().ok()
        })
        .expect("redis-server answers");
    let script = redis::Script::new(include_str!("../settle.lua"));
    let mut random = Random(0x5EED_1234_ABCD_0001);
    for case in 0..1_500 {
        let (before, call) = random.case();
        let mut model = before;
        let answer = settle_lua(&mut model, &call);
        let real = run_settle(&mut link, &script, &before, &call, before.generation);
        let drawn = before.generation;
        let want = (answered(&answer, drawn), window_keys(&model, drawn));
        let got = (real, read_window(&mut link, drawn));
        assert_eq!(got, want, "case {case}: {before:?}");
    }
}

/// A redis-server, killed when the test ends, failed or not.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const RUNS_DRAWN: usize = 3;
const MARKS: &str = "test:{w}:marks";
const RECORD: &str = "test:{w}:record";

/// A small xorshift: the cases are the same every time.
struct Random(u64);

impl Random {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }

    fn mark(&mut self) -> Option<Mark> {
        [
            None,
            Some(Mark::Sending),
            Some(Mark::Full),
            Some(Mark::Partial),
        ][self.next(4) as usize]
    }

    fn record(&mut self) -> Option<Record> {
        (self.next(3) > 0).then(|| Record {
            revision: [
                1,
                2,
                3,
                rules::first_revision(WINDOW, Some(WINDOW.unix_secs() * 1000 + 1)),
            ][self.next(4) as usize],
            count: self.next(4) as u8,
            complete: self.next(2) == 1,
            partial: self.next(2) == 1,
            instances: self.next(3) as u8,
            by: self.next(RUNS_DRAWN as u64) as Run,
            counted: 0,
        })
    }

    /// A window's keys and a call of the script on them.
    fn case(&mut self) -> (Redis, SettleCall) {
        let mut redis = Redis::default();
        for r in 0..RUNS_DRAWN {
            redis.marks[r] = self.mark();
        }
        redis.record = self.record();
        redis.generation = self.next(3);
        // Redis's clock is far past every generation drawn, as it is in the
        // script (microseconds since 1970).
        redis.clock = 1_000;
        let call = SettleCall {
            me: self.next(RUNS_DRAWN as u64) as Run,
            mark: self.mark().filter(|mark| *mark != Mark::Sending),
            force: [Force::No, Force::Yes][self.next(2) as usize],
            generation: [None, Some(0), Some(1), Some(2), Some(3)][self.next(5) as usize],
            never_complete: self.next(4) == 0,
            count: self.next(4) as u8,
            counted: 0,
            known: self.record(),
            first_revision: [
                1,
                rules::first_revision(WINDOW, Some(WINDOW.unix_secs() * 1000 + 1)),
            ][self.next(2) as usize],
            live: self.next(1 << RUNS_DRAWN) as Runs,
            more: self.next(1 << RUNS_DRAWN) as Runs,
        };
        (redis, call)
    }
}

fn name(r: Run) -> String {
    name_of(r, RUNS_DRAWN)
}

fn mark_text(mark: Mark) -> &'static str {
    match mark {
        Mark::Sending => "sending",
        Mark::Full => "full",
        Mark::Partial => "partial",
    }
}

/// The script's answer: outcome, the record's (revision, count, complete,
/// partial, instances, by), the generation ([`generation`]), the runs marked,
/// release.
type Answer = (
    String,
    (u64, u64, u8, u8, u64, String),
    String,
    Vec<String>,
    u8,
);

/// A generation as compared: `fresh` if above the one `drawn` (a new one), else
/// its value.
fn generation(value: u64, drawn: u64) -> String {
    match value > drawn {
        true => "fresh".into(),
        false => value.to_string(),
    }
}

fn answered(answer: &SettleAnswer, drawn: u64) -> Answer {
    let outcome = match answer.outcome {
        Outcome::Gone => "gone",
        Outcome::Again => "again",
        Outcome::Published => "published",
        Outcome::Known => "known",
        Outcome::Pending => "pending",
    };
    let record = answer.record.map_or((0, 0, 0, 0, 0, String::new()), |r| {
        let flags = (u8::from(r.complete), u8::from(r.partial));
        (
            r.revision,
            u64::from(r.count),
            flags.0,
            flags.1,
            u64::from(r.instances),
            name(r.by),
        )
    });
    let mut members: Vec<String> = runs_in(answer.members).map(name).collect();
    members.sort();
    (
        outcome.into(),
        record,
        generation(answer.generation, drawn),
        members,
        u8::from(answer.release),
    )
}

/// The marks, and the record's fields with the generation, as Redis would hold them.
type Keys = (Vec<(String, String)>, Vec<(String, String)>);

fn window_keys(redis: &Redis, drawn: u64) -> Keys {
    let marks = (0..RUNS_DRAWN)
        .filter_map(|r| redis.marks[r].map(|m| (name(r), mark_text(m).to_owned())))
        .collect();
    let mut record: Vec<(String, String)> = match redis.record {
        Some(r) => vec![
            ("revision", r.revision.to_string()),
            ("unique_requests", r.count.to_string()),
            ("complete", u8::from(r.complete).to_string()),
            ("partial", u8::from(r.partial).to_string()),
            ("instances", r.instances.to_string()),
            ("by", name(r.by)),
        ],
        None => Vec::new(),
    }
    .into_iter()
    .map(|(field, value)| (field.to_owned(), value))
    .collect();
    if redis.generation > 0 {
        record.push(("generation".into(), generation(redis.generation, drawn)));
    }
    record.sort();
    (marks, record)
}

fn read_window(link: &mut redis::Connection, drawn: u64) -> Keys {
    let mut marks: Vec<(String, String)> = redis::cmd("HGETALL").arg(MARKS).query(link).unwrap();
    marks.sort();
    let all: Vec<(String, String)> = redis::cmd("HGETALL").arg(RECORD).query(link).unwrap();
    // Fields the model leaves out: when it was published, what was acknowledged.
    let mut record: Vec<(String, String)> = all
        .into_iter()
        .filter(|(field, _)| field != "published_at" && field != "acked")
        .map(|(field, value)| match field == "generation" {
            true => (field, generation(value.parse().expect("a number"), drawn)),
            false => (field, value),
        })
        .collect();
    record.sort();
    (marks, record)
}

/// Writes `redis`'s window keys, runs the script with `call`, returns its answer.
fn run_settle(
    link: &mut redis::Connection,
    script: &redis::Script,
    redis: &Redis,
    call: &SettleCall,
    drawn: u64,
) -> Answer {
    redis::cmd("DEL").arg(MARKS).arg(RECORD).exec(link).unwrap();
    for r in 0..RUNS_DRAWN {
        if let Some(mark) = redis.marks[r] {
            redis::cmd("HSET")
                .arg(MARKS)
                .arg(name(r))
                .arg(mark_text(mark))
                .exec(link)
                .unwrap();
        }
    }
    if let Some(r) = redis.record {
        redis::cmd("HSET")
            .arg(RECORD)
            .arg(&[
                "revision",
                &r.revision.to_string(),
                "unique_requests",
                &r.count.to_string(),
            ])
            .arg(&[
                "complete",
                if r.complete { "1" } else { "0" },
                "partial",
                if r.partial { "1" } else { "0" },
            ])
            .arg(&[
                "instances",
                &r.instances.to_string(),
                "published_at",
                "7",
                "acked",
                "0",
                "by",
                &name(r.by),
            ])
            .exec(link)
            .unwrap();
    }
    if redis.generation > 0 {
        redis::cmd("HSET")
            .arg(RECORD)
            .arg("generation")
            .arg(redis.generation)
            .exec(link)
            .unwrap();
    }
    let mut invoke = script.prepare_invoke();
    invoke.key(MARKS).key(RECORD).arg(name(call.me));
    invoke.arg(call.mark.map_or("", mark_text));
    invoke.arg(match call.force {
        Force::No => "0",
        Force::Yes => "1",
    });
    invoke.arg(300).arg(3600);
    invoke.arg(call.generation.map_or(String::new(), |g| g.to_string()));
    invoke.arg(call.count);
    match call.known {
        Some(k) => invoke
            .arg(k.revision)
            .arg(k.count)
            .arg(u8::from(k.complete))
            .arg(u8::from(k.partial))
            .arg(k.instances)
            .arg(7)
            .arg(0)
            .arg(name(k.by)),
        None => invoke.arg(&[0u64; 7][..]).arg(""),
    };
    invoke.arg(call.first_revision);
    invoke.arg(u8::from(call.never_complete));
    let live: Vec<String> = runs_in(call.live).map(name).collect();
    let more: Vec<String> = runs_in(call.more).map(name).collect();
    invoke.arg(live.len()).arg(&live).arg(&more);
    type Head = (String, u64, u64, u8, u8, u64, u64);
    type Tail = (String, u64, u64, Vec<String>, u64, u8);
    let ((outcome, revision, count, complete, partial, instances, _), tail): (Head, Tail) =
        invoke.invoke(link).unwrap();
    let (by, generation, _done, mut members, _acked, release) = tail;
    members.sort();
    (
        outcome,
        (revision, count, complete, partial, instances, by),
        self::generation(generation, drawn),
        members,
        release,
    )
}
