//! A writer that counts what the socket accepted and holds it to `max-bandwidth`.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts accepted bytes; sleeps when a 20 ms slice's budget is spent.
pub struct RateLimited<W> {
    inner: W,
    /// Bytes per second, 0 = unlimited (shared so the limit can change mid-migration).
    limit: Arc<AtomicU64>,
    /// Bytes accepted so far (shared with the statistics).
    pub accepted: Arc<AtomicU64>,
    slice_start: Instant,
    slice_bytes: u64,
    /// How many writers share the limit (parallel channels): each gets this fraction.
    share: u64,
}

const SLICE: Duration = Duration::from_millis(20);

impl<W: Write> RateLimited<W> {
    pub fn new(inner: W, limit: Arc<AtomicU64>, accepted: Arc<AtomicU64>) -> Self {
        RateLimited {
            inner,
            limit,
            accepted,
            slice_start: Instant::now(),
            slice_bytes: 0,
            share: 1,
        }
    }

    /// One of `n` writers that share the limit.
    pub fn shared_by(mut self, n: u64) -> Self {
        self.share = n.max(1);
        self
    }

    fn limit(&self) -> u64 {
        match self.limit.load(Ordering::Relaxed) {
            0 => 0,
            l => (l / self.share).max(1),
        }
    }

    fn throttle(&mut self) {
        let limit = self.limit();
        if limit == 0 {
            return;
        }
        let budget = (limit as f64 * SLICE.as_secs_f64()) as u64;
        let elapsed = self.slice_start.elapsed();
        if elapsed >= SLICE {
            self.slice_start = Instant::now();
            self.slice_bytes = 0;
        } else if self.slice_bytes >= budget.max(1) {
            std::thread::sleep(SLICE - elapsed);
            self.slice_start = Instant::now();
            self.slice_bytes = 0;
        }
    }
}

impl<W: Write> Write for RateLimited<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.throttle();
        let limit = self.limit();
        // Never hand the socket more than one slice's worth while limited.
        let max = if limit == 0 {
            buf.len()
        } else {
            ((limit as f64 * SLICE.as_secs_f64()) as usize)
                .max(4096)
                .min(buf.len())
        };
        let n = self.inner.write(&buf[..max])?;
        self.slice_bytes += n as u64;
        self.accepted.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_rate_and_counts_accepted_bytes() {
        let limit = Arc::new(AtomicU64::new(10 << 20));
        let accepted = Arc::new(AtomicU64::new(0));
        let mut w = RateLimited::new(io::sink(), limit, accepted.clone());
        let t = Instant::now();
        let buf = vec![0u8; 1 << 20];
        for _ in 0..3 {
            w.write_all(&buf).unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(accepted.load(Ordering::Relaxed), 3 << 20);
        assert!(secs > 0.2, "3 MiB at 10 MiB/s took only {secs} s");
    }

    #[test]
    fn unlimited_is_not_slowed() {
        let mut w = RateLimited::new(
            io::sink(),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let t = Instant::now();
        w.write_all(&vec![0u8; 64 << 20]).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
