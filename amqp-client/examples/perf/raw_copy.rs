//! The yardstick for large bodies: the same number of bytes copied over a
//! plain loopback TCP connection, by a writer thread that sends one
//! message-sized buffer over and over and a reader that reads into one
//! message-sized buffer, front to back and again (so that both touch as much
//! memory per message as the client and its peer do). No framing, no
//! allocation per message: what the kernel's copies cost and no more.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The most one write or read asks for.
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

/// Copies `bytes` bytes, as messages of `message` bytes, from one thread to
/// another over loopback TCP.
pub fn run(bytes: u64, message: usize) -> std::io::Result<Copied> {
    let message = message.max(1);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let cpu_before = super::cpu_time();
    let started = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut stream = TcpStream::connect(address)?;
        stream.set_nodelay(true)?;
        let body = vec![b'r'; message];
        let mut left = bytes;
        let mut offset = 0;
        while left > 0 {
            let n = (left.min(CHUNK as u64) as usize).min(message - offset);
            stream.write_all(&body[offset..offset + n])?;
            offset = (offset + n) % message;
            left -= n as u64;
        }
        Ok(())
    });
    let (mut stream, _) = listener.accept()?;
    let mut body = vec![0u8; message];
    let mut offset = 0;
    let mut received = 0u64;
    while received < bytes {
        let end = (offset + CHUNK).min(message);
        match stream.read(&mut body[offset..end])? {
            0 => break,
            n => {
                received += n as u64;
                offset = (offset + n) % message;
            }
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
