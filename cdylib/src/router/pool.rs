//! Worker threads for calls with a deadline (`bounded`): a call is handed to
//! an idle worker, or to a new one when none is idle, so that its caller can
//! stop waiting at the deadline. Workers idle for a while end; all end at
//! `C_Finalize`, each once its call has returned.

use std::collections::VecDeque;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

/// A call to run.
pub type Job = Box<dyn FnOnce() + Send>;

/// Most workers at once (abandoned calls each hold one until they return).
const MAX_WORKERS: usize = 256;
/// How long a worker waits for work before it ends.
const IDLE: Duration = Duration::from_secs(10);

struct State {
    jobs: VecDeque<Job>,
    /// Workers waiting for work and not yet promised a job.
    idle: usize,
    total: usize,
    stop: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    jobs: VecDeque::new(),
    idle: 0,
    total: 0,
    stop: false,
});
static WAKE: Condvar = Condvar::new();

/// Runs `job` on a worker.
pub fn submit(job: Job) -> std::io::Result<()> {
    let mut st = STATE.lock();
    st.jobs.push_back(job);
    if st.idle > 0 {
        st.idle -= 1;
        drop(st);
        WAKE.notify_one();
        return Ok(());
    }
    if st.total >= MAX_WORKERS {
        // Every worker is busy (most with abandoned calls): the job waits
        // for one, and its caller's deadline still holds.
        return Ok(());
    }
    st.total += 1;
    drop(st);
    let spawned = std::thread::Builder::new()
        .name("p11shim-call".into())
        .spawn(work);
    if let Err(e) = spawned {
        STATE.lock().total -= 1;
        return Err(e);
    }
    Ok(())
}

fn work() {
    let mut st = STATE.lock();
    loop {
        if let Some(job) = st.jobs.pop_front() {
            drop(st);
            job();
            st = STATE.lock();
            continue;
        }
        if st.stop {
            break;
        }
        st.idle += 1;
        let timed_out = WAKE.wait_for(&mut st, IDLE).timed_out();
        if st.jobs.is_empty() {
            // Woken for nothing (another worker took the job, or stop):
            // this worker is no longer idle.
            st.idle = st.idle.saturating_sub(1);
            if timed_out || st.stop {
                break;
            }
        }
    }
    st.total -= 1;
}

/// Lets workers run again after a stop (`C_Initialize`).
pub fn start() {
    STATE.lock().stop = false;
}

/// Ends every worker once its call returns (`C_Finalize`).
pub fn stop() {
    STATE.lock().stop = true;
    WAKE.notify_all();
}
