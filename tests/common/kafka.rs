//! Reading back what verve published, with rdkafka's consumer.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: String,
    pub value: serde_json::Value,
}

/// A consumer of partition 0 of `topic`, from the beginning.
pub fn consumer(brokers: &str, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "verve-tests")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut partitions = TopicPartitionList::new();
    partitions
        .add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&partitions).unwrap();
    consumer
}

/// Polls until `done` holds for the records read so far, and returns them.
pub fn read_until(
    consumer: &BaseConsumer,
    limit: Duration,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let deadline = Instant::now() + limit;
    let mut records = Vec::new();
    while !done(&records) {
        assert!(Instant::now() < deadline, "records so far: {records:?}");
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => records.push(record(&message)),
            // librdkafka reports connection trouble (`AllBrokersDown` while it
            // reconnects to a busy broker) as errors between messages and recovers
            // by itself; the deadline above still bounds the wait.
            Some(Err(err)) => eprintln!("consumer: {err} (polling on)"),
            None => {}
        }
    }
    records
}

/// Every record partition 0 of `topic` holds, all of them: the partition's end
/// offset is read first, so a duplicate cannot hide behind a timeout.
pub fn all_records(brokers: &str, topic: &str, limit: Duration) -> Vec<Record> {
    let consumer = consumer(brokers, topic);
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, limit)
        .unwrap_or_else(|e| panic!("watermarks of {topic}: {e}"));
    let expected = usize::try_from(high - low).unwrap();
    read_until(&consumer, limit, |r| r.len() >= expected)
}

fn record(message: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    let key = String::from_utf8(message.key().unwrap().to_vec()).unwrap();
    let value = serde_json::from_slice(message.payload().unwrap()).unwrap();
    Record { key, value }
}
