//! A real load balancer for tests: haproxy (Debian's package; scripts/test.sh
//! installs it) on a free loopback port, in HTTP mode, spreading requests round
//! robin over the given backends. Its configuration is written here.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::redis_server::free_port;

pub struct Haproxy {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    pub fn start(backends: &[SocketAddr]) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, addr)| format!("    server verve{i} {addr}\n"))
            .collect();
        // HTTP mode balances each request, so one keep-alive client connection
        // reaches both instances; haproxy answers pipelined requests in order.
        let config = format!(
            "global\n    maxconn 4096\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\
             frontend front\n    bind 127.0.0.1:{port}\n    default_backend fleet\n\
             backend fleet\n    balance roundrobin\n{servers}"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy on PATH (scripts/test.sh installs it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        super::eventually(
            Duration::from_secs(10),
            || format!("haproxy on {addr}"),
            || TcpStream::connect(addr).ok(),
        );
        Haproxy {
            addr,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
