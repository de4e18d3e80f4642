//! The return-path thread: reads what the target sends and turns it into typed events, so that
//! the sender never blocks on a read while it has pages to send (postcopy's page requests will
//! arrive the same way).

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_wire::{record_type, RecordReader, ReturnMessage, MAX_RETURN_MESSAGE};

use crate::transport::Connection;
use crate::{MigrateError, Result};

/// One thing the target said, or the end of the return path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TargetEvent {
    Message(ReturnMessage),
    /// The return path ended: `None` for a clean close, else why it broke.
    Closed(Option<String>),
}

/// The receiving end of the return path.
/// Where page requests go instead of the events, if anywhere.
type Router = Arc<Mutex<Option<Sender<(u32, u64, u64)>>>>;

pub(crate) struct ReturnPath {
    events: Receiver<(TargetEvent, Instant)>,
    router: Router,
    /// How long a wait polls before it sleeps.
    spin: Duration,
    /// When the last event taken arrived on the socket (the sender may wake later: the
    /// switch-over's timings use this).
    arrived: Option<Instant>,
    thread: Option<JoinHandle<()>>,
    /// Set once `Closed` was taken out of the queue.
    closed: Option<Option<String>>,
}

impl ReturnPath {
    /// Starts the reader thread on `conn` (a handle on the migration's socket; the thread
    /// ends when the socket is shut down or the target closes it).
    pub(crate) fn start(conn: Connection) -> Result<ReturnPath> {
        let (tx, rx) = mpsc::channel();
        let router: Router = Arc::new(Mutex::new(None));
        let routes = router.clone();
        let thread = std::thread::Builder::new()
            .name("migration-ret".into())
            .spawn(move || {
                let router = routes;
                // A longer message is refused from its header, never read into memory.
                let mut r = RecordReader::new(conn).with_max_body(MAX_RETURN_MESSAGE);
                loop {
                    let record = r.next_record();
                    let at = Instant::now();
                    let ev = match record {
                        Ok(None) => TargetEvent::Closed(None),
                        Ok(Some(rec)) if rec.ty != record_type::RETURN_MESSAGE => {
                            TargetEvent::Closed(Some(format!(
                                "unexpected record type {:#x} on the return path",
                                rec.ty
                            )))
                        }
                        Ok(Some(rec)) if rec.body.len() > MAX_RETURN_MESSAGE => {
                            TargetEvent::Closed(Some(format!(
                                "a return message of {} bytes",
                                rec.body.len()
                            )))
                        }
                        Ok(Some(rec)) => match ReturnMessage::decode(rec.body) {
                            // Postcopy-preempt: page requests go straight to the urgent
                            // sender, never behind the main thread's work.
                            Ok(ReturnMessage::PageRequest {
                                region,
                                first_page,
                                count,
                            }) if router
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .as_ref()
                                .is_some_and(|tx| tx.send((region, first_page, count)).is_ok()) =>
                            {
                                continue
                            }
                            Ok(m) => TargetEvent::Message(m),
                            Err(k) => TargetEvent::Closed(Some(format!("bad return message: {k}"))),
                        },
                        Err(e) => TargetEvent::Closed(Some(e.to_string())),
                    };
                    let last = matches!(ev, TargetEvent::Closed(_));
                    if tx.send((ev, at)).is_err() || last {
                        return;
                    }
                }
            })
            .map_err(MigrateError::io("starting the return-path thread"))?;
        Ok(ReturnPath {
            events: rx,
            spin: Duration::ZERO,
            arrived: None,
            thread: Some(thread),
            closed: None,
            router,
        })
    }

    /// Postcopy-preempt: page requests go to `to` from now on (`None`: back to the events).
    pub(crate) fn route_requests(&self, to: Option<Sender<(u32, u64, u64)>>) {
        *self.router.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }

    /// The next event, waiting at most `timeout`; `None` on timeout. After `Closed` every call
    /// returns `Closed` again.
    pub(crate) fn next(&mut self, timeout: Duration) -> Option<TargetEvent> {
        if let Some(why) = &self.closed {
            return Some(TargetEvent::Closed(why.clone()));
        }
        // In the switch-over the answer comes within a millisecond or two while the guest is
        // stopped: poll for a short while (yielding the core to anyone runnable) rather than
        // sleep, since waking a sleeping thread costs about as much as the answer itself here.
        let spin_until = Instant::now() + self.spin.min(timeout);
        let timeout = loop {
            match self.events.try_recv() {
                Ok(ev) => return Some(self.take(ev)),
                Err(mpsc::TryRecvError::Disconnected) => break Duration::ZERO,
                Err(mpsc::TryRecvError::Empty) if Instant::now() < spin_until => {
                    std::thread::yield_now()
                }
                Err(mpsc::TryRecvError::Empty) => break timeout.saturating_sub(self.spin),
            }
        };
        match self.events.recv_timeout(timeout) {
            Ok(ev) => Some(self.take(ev)),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                self.closed = Some(None);
                Some(TargetEvent::Closed(None))
            }
        }
    }

    fn take(&mut self, (ev, at): (TargetEvent, Instant)) -> TargetEvent {
        self.arrived = Some(at);
        if let TargetEvent::Closed(why) = &ev {
            self.closed = Some(why.clone());
        }
        ev
    }

    /// From now on, waits poll for up to `spin` before they sleep (the switch-over's).
    pub(crate) fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// When the event [`ReturnPath::next`] returned last arrived.
    pub(crate) fn arrived(&self) -> Option<Instant> {
        self.arrived
    }

    /// Whether the target has closed the return path or said ERROR (looked up without
    /// waiting; other messages queued meanwhile are dropped, as nothing is expected then).
    pub(crate) fn peer_gone(&mut self) -> Option<String> {
        loop {
            match self.next(Duration::ZERO) {
                None => return None,
                Some(TargetEvent::Closed(why)) => {
                    return Some(why.unwrap_or_else(|| "the target closed the connection".into()))
                }
                Some(TargetEvent::Message(ReturnMessage::Error { message, .. })) => {
                    return Some(format!("the target refused: {message}"))
                }
                Some(TargetEvent::Message(m)) => {
                    tracing::warn!("unexpected return message {m:?}; ignored")
                }
            }
        }
    }

    /// Waits up to `timeout` for a message that `want` accepts. An ERROR from the target, the
    /// end of the return path, another message or the timeout are errors (a cancel shuts the
    /// socket down, so it ends the wait too).
    pub(crate) fn expect<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&ReturnMessage) -> Option<T>,
    ) -> Result<T> {
        match self.next(timeout) {
            None => Err(MigrateError::Vm(format!(
                "the target did not send {what} within {} s",
                timeout.as_secs()
            ))),
            Some(TargetEvent::Message(m)) => match want(&m) {
                Some(t) => Ok(t),
                None => Err(match m {
                    ReturnMessage::Error { message, .. } => MigrateError::TargetRefused(message),
                    other => MigrateError::Vm(format!(
                        "the target sent {other:?} while {what} was expected"
                    )),
                }),
            },
            Some(TargetEvent::Closed(None)) => Err(MigrateError::NoAck),
            Some(TargetEvent::Closed(Some(why))) => {
                Err(MigrateError::Vm(format!("the return path broke: {why}")))
            }
        }
    }

    /// After the stream broke: the target's reason, if it said one before closing.
    pub(crate) fn reason(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left)? {
                TargetEvent::Message(ReturnMessage::Error { message, .. }) => return Some(message),
                TargetEvent::Message(_) => {}
                TargetEvent::Closed(_) => return None,
            }
        }
    }

    /// Waits for the thread (the caller has shut the socket down).
    pub(crate) fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
