//! The yardstick for large bodies: the same number of bytes copied over a
//! plain loopback TCP connection, by a writer thread that sends one buffer
//! over and over and a reader that reads into one reused buffer. No framing,
//! no allocation per message: what the kernel's copies cost and no more.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The writer's buffer and the reader's read size: the client's own read
/// room when busy is 64 KiB, and larger reads only copy faster.
const CHUNK: usize = 256 * 1024;

/// What one copy took.
pub struct Copied {
    pub bytes: u64,
    pub elapsed: Duration,
    /// User + system CPU of both threads.
    pub cpu: Duration,
}

impl Copied {
    pub fn bytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64()
    }
}

/// Copies `bytes` bytes from one thread to another over loopback TCP.
pub fn run(bytes: u64) -> std::io::Result<Copied> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let cpu_before = super::cpu_time();
    let started = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut stream = TcpStream::connect(address)?;
        stream.set_nodelay(true)?;
        let chunk = vec![b'r'; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            stream.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let (mut stream, _) = listener.accept()?;
    let mut buffer = vec![0u8; CHUNK];
    let mut received = 0u64;
    while received < bytes {
        match stream.read(&mut buffer)? {
            0 => break,
            n => received += n as u64,
        }
    }
    let elapsed = started.elapsed();
    writer
        .join()
        .map_err(|_| std::io::Error::other("the writer panicked"))??;
    Ok(Copied {
        bytes: received,
        elapsed,
        cpu: super::cpu_time().saturating_sub(cpu_before),
    })
}
