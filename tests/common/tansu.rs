//! A real Kafka-protocol broker for tests: tansu, in memory, on a free loopback
//! port. scripts/test.sh installs it (`cargo install tansu --features dynostore`).

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::redis_server::free_port;

pub struct Tansu {
    pub port: u16,
    child: Child,
}

impl Tansu {
    pub fn start() -> Tansu {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu on PATH (scripts/test.sh installs it)");
        let listening = || TcpStream::connect(("127.0.0.1", port)).ok();
        super::eventually(
            Duration::from_secs(20),
            || format!("tansu on port {port}"),
            listening,
        );
        Tansu { port, child }
    }

    /// `host:port`, as `VERVE_KAFKA_BROKERS` wants it.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, topic: &str) {
        let status = Command::new("tansu")
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
            ])
            .args(["--partitions", "1", topic])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tansu topic create {topic}: {status}");
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
