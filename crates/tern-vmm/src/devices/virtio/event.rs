//! The event thread: waits on every queue's notification eventfd and serves the queue. One
//! thread for all virtio devices; the vCPUs never do device I/O.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::VirtioMmio;

/// The running thread; told to stop on drop, and not waited for: it may be blocked on guest
/// memory that will never come (a postcopy whose source is lost), and it owns everything it
/// touches (the devices and guest memory are reference-counted).
pub struct EventThread {
    stop: EventFd,
    _thread: JoinHandle<()>,
}

const STOP: u64 = u64::MAX;
/// Marks an event of a device's backend (a TAP), not of a queue's notification eventfd.
const BACKEND: u64 = 1 << 15;

impl EventThread {
    /// Starts serving `devices`.
    pub fn start(devices: Vec<Arc<VirtioMmio>>) -> std::io::Result<EventThread> {
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let epoll = Epoll::new()?;
        let add = |fd: i32, data: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )
        };
        add(stop.as_raw_fd(), STOP)?;
        for (d, dev) in devices.iter().enumerate() {
            for (q, n) in dev.notify.iter().enumerate() {
                add(n.as_raw_fd(), ((d as u64) << 16) | q as u64)?;
            }
            // Edge-triggered: the device reads until the backend is empty or the guest has no
            // room; in the second case the guest's next notification brings it back, and a
            // level-triggered wait would spin meanwhile.
            if let Some((fd, q)) = dev.backend() {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(
                        EventSet::IN | EventSet::EDGE_TRIGGERED,
                        ((d as u64) << 16) | BACKEND | q as u64,
                    ),
                )?;
            }
        }
        let stop2 = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("virtio-io".into())
            .spawn(move || run(epoll, devices, stop2))?;
        Ok(EventThread {
            stop,
            _thread: thread,
        })
    }
}

fn run(epoll: Epoll, devices: Vec<Arc<VirtioMmio>>, _stop: EventFd) {
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio event thread: epoll: {e}; devices stop");
                return;
            }
        };
        if events[..n].iter().any(|e| e.data() == STOP) {
            return;
        }
        for ev in &events[..n] {
            let data = ev.data();
            let (d, q) = ((data >> 16) as usize, (data & 0x7fff) as usize);
            if let Some(dev) = devices.get(d) {
                if data & BACKEND == 0 {
                    // Consume the count first: a notification that comes while we serve is
                    // seen.
                    let _ = dev.notify[q].read();
                }
                dev.serve(q);
            }
        }
    }
}

impl Drop for EventThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
    }
}
