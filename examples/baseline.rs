//! The bare baseline for benchmarks: the same thread-per-core shape as verve
//! (one monoio runtime and one SO_REUSEPORT listener per worker, pinned, httparse,
//! owned buffers reused, one write per read) that answers `ok` to every request and
//! does nothing else. Whatever verve costs above this is the cost of counting.
//!
//! Reads `VERVE_ADDR`, `VERVE_WORKERS` and `VERVE_IO_DRIVER` (`uring` or `epoll`)
//! like verve, so the load-test runner starts both the same way. It borrows only
//! verve's CPU pinning helpers, so both spread over the same CPUs.

use std::net::SocketAddr;

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use verve::server::affinity;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";

fn main() {
    let env = |key: &str, default: &str| std::env::var(key).unwrap_or_else(|_| default.to_owned());
    let addr: SocketAddr = env("VERVE_ADDR", "0.0.0.0:8080")
        .parse()
        .expect("VERVE_ADDR");
    let workers: usize = env("VERVE_WORKERS", "1").parse().expect("VERVE_WORKERS");
    let uring = match env("VERVE_IO_DRIVER", "epoll").as_str() {
        "uring" => true,
        "epoll" => false,
        other => panic!("VERVE_IO_DRIVER must be uring or epoll for the baseline, not {other}"),
    };
    let cpus = affinity::allowed_cpus().expect("sched_getaffinity");
    let threads: Vec<_> = (0..workers)
        .map(|i| {
            let cpu = cpus[i % cpus.len()];
            std::thread::spawn(move || {
                affinity::pin_current_thread(cpu).expect("sched_setaffinity");
                if uring {
                    let mut rt = RuntimeBuilder::<IoUringDriver>::new()
                        .build()
                        .expect("io_uring runtime");
                    rt.block_on(serve(addr));
                } else {
                    let mut rt = RuntimeBuilder::<LegacyDriver>::new()
                        .build()
                        .expect("epoll runtime");
                    rt.block_on(serve(addr));
                }
            })
        })
        .collect();
    eprintln!("baseline listening addr={addr} workers={workers} uring={uring}");
    for thread in threads {
        thread.join().unwrap();
    }
}

async fn serve(addr: SocketAddr) {
    let options = ListenerOpts::new().reuse_port(true).reuse_addr(true);
    let listener = TcpListener::bind_with_config(addr, &options).expect("bind");
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            monoio::spawn(connection(stream));
        }
    }
}

async fn connection(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut read_buf: Vec<u8> = Vec::with_capacity(4096);
    let mut write_buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        if read_buf.capacity() - read_buf.len() < 1024 {
            read_buf.reserve(4096);
        }
        let (len, capacity) = (read_buf.len(), read_buf.capacity());
        let (read, slice) = stream.read(read_buf.slice_mut(len..capacity)).await;
        read_buf = slice.into_inner();
        if !matches!(read, Ok(n) if n > 0) {
            return;
        }
        let mut consumed = 0;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&read_buf[consumed..]) {
                Ok(httparse::Status::Complete(n)) => {
                    consumed += n;
                    write_buf.extend_from_slice(OK);
                }
                Ok(httparse::Status::Partial) => break,
                Err(_) => return,
            }
        }
        read_buf.drain(..consumed);
        let (written, returned) = stream.write_all(write_buf).await;
        write_buf = returned;
        write_buf.clear();
        if written.is_err() {
            return;
        }
    }
}
