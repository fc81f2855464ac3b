//! The recovery thread: probes down members with exponential backoff, logs
//! them in again and returns them to service, whether or not the
//! application is calling.
//!
//! It holds no reference to the library while it sleeps, stops at
//! `C_Finalize` and when the module is unloaded, and is never started when
//! the application forbids threads (`CKF_LIBRARY_CANT_CREATE_OS_THREADS`);
//! then probes run inline, from the application's own calls.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Stop signal and wake-up of the recovery thread.
#[derive(Debug, Default)]
pub struct Control {
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Control {
    /// Wakes the thread early (a member just went down).
    pub fn nudge(&self) {
        self.wake.notify_all();
    }

    fn stopped(&self) -> bool {
        *self.stop.lock()
    }

    /// Sleeps until `deadline`, a nudge or the stop signal.
    fn sleep_until(&self, deadline: Instant) {
        let mut stop = self.stop.lock();
        if !*stop {
            self.wake.wait_until(&mut stop, deadline);
        }
    }
}

/// Something the thread can probe.
pub trait Probe: Send + Sync + 'static {
    /// Probes the members that are due; returns when to look again.
    fn probe_due(&self, now: Instant) -> Option<Instant>;
}

/// A running recovery thread.
#[derive(Debug)]
pub struct Thread {
    control: Arc<Control>,
    handle: Option<JoinHandle<()>>,
}

/// Longest sleep between two looks, so that a missed nudge costs little.
const IDLE: Duration = Duration::from_secs(1);

impl Thread {
    /// Starts the thread over a weakly held target.
    pub fn start<P: Probe>(target: Weak<P>, control: Arc<Control>) -> std::io::Result<Thread> {
        let c = control.clone();
        let handle = std::thread::Builder::new()
            .name("p11shim-recovery".into())
            .spawn(move || {
                loop {
                    if c.stopped() {
                        return;
                    }
                    let next = match target.upgrade() {
                        Some(t) => t.probe_due(Instant::now()),
                        None => return,
                    };
                    let now = Instant::now();
                    c.sleep_until(next.map_or(now + IDLE, |n| n.min(now + IDLE)));
                }
            })?;
        Ok(Thread {
            control,
            handle: Some(handle),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        *self.control.stop.lock() = true;
        self.control.wake.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Thread {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Counter(AtomicU32);

    impl Probe for Counter {
        fn probe_due(&self, now: Instant) -> Option<Instant> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Some(now + Duration::from_millis(5))
        }
    }

    #[test]
    fn probes_until_stopped() {
        let target = Arc::new(Counter(AtomicU32::new(0)));
        let control = Arc::new(Control::default());
        let mut t = Thread::start(Arc::downgrade(&target), control).unwrap();
        let start = Instant::now();
        while target.0.load(Ordering::Relaxed) < 3 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
        }
        t.stop();
        let n = target.0.load(Ordering::Relaxed);
        assert!(n >= 3);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(target.0.load(Ordering::Relaxed), n, "no probe after stop");
    }

    #[test]
    fn ends_when_the_target_is_gone() {
        let target = Arc::new(Counter(AtomicU32::new(0)));
        let control = Arc::new(Control::default());
        let mut t = Thread::start(Arc::downgrade(&target), control.clone()).unwrap();
        drop(target);
        control.nudge();
        // The thread returns on its own once the target is dropped (no stop
        // signal is sent before the join).
        t.handle.take().unwrap().join().unwrap();
    }
}
