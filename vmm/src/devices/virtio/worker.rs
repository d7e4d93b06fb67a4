//! A virtio device's I/O thread: one thread per device, an epoll loop over the device's own fds
//! (queue notifications, a tap, io_uring completions) and a wake eventfd through which the VMM
//! thread pauses, resumes and stops it.
//!
//! The device says what to watch and what to do in an [`IoHandler`]; [`Worker::spawn`] runs the
//! loop. The thread starts paused (the transport resumes it when the guest runs, also after a
//! restore). A pause ([`Worker::pause`]) returns once the handler has finished what it had in
//! hand ([`IoHandler::pause`]: a disk's requests in flight are in the used ring, a NIC is
//! between frames) and the thread takes no more work; a handler working through a long batch
//! checks [`Control::running`] between items so a pause does not wait for the whole batch.
//! Every resume is honoured with one pass of work, even when a pause follows it at once.
//! Pauses are numbered: each waits for the thread to acknowledge its own number, so two pauses
//! from two threads never take one acknowledgement for both.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::devices::lock;

const WANT_PAUSE: u8 = 0;
const WANT_RUN: u8 = 1;
const WANT_STOP: u8 = 2;

/// The epoll token of the wake eventfd; a handler's own tokens must differ from it.
pub const TOKEN_WAKE: u64 = u64::MAX;

/// How the VMM thread steers an I/O thread: what it wants (run, pause, stop) and a wake eventfd
/// in the thread's epoll set.
pub struct Control {
    want: AtomicU8,
    wake: EventFd,
    /// Resumes asked so far: every one is honoured with a pass of work, even when a pause
    /// follows before the thread looks.
    resumes_asked: AtomicU64,
    pauses_asked: AtomicU64,
    pauses_done: Mutex<u64>,
    pause_done: Condvar,
}

impl Control {
    /// Paused: the transport resumes it when the guest runs.
    pub fn new() -> std::io::Result<Self> {
        Ok(Control {
            want: AtomicU8::new(WANT_PAUSE),
            wake: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            resumes_asked: AtomicU64::new(0),
            pauses_asked: AtomicU64::new(0),
            pauses_done: Mutex::new(0),
            pause_done: Condvar::new(),
        })
    }

    fn set(&self, want: u8) {
        self.want.store(want, Ordering::SeqCst);
        let _ = self.wake.write(1);
    }

    /// Lets the thread work. The thread makes one pass over its work for this resume even if
    /// a pause comes before it looks (as after a restore: whatever the driver queued is taken).
    pub fn resume(&self) {
        self.resumes_asked.fetch_add(1, Ordering::SeqCst);
        self.set(WANT_RUN);
    }

    /// Asks the thread to end (it finishes what is in flight first, see [`IoHandler::stop`]).
    pub fn stop(&self) {
        self.set(WANT_STOP);
    }

    /// Returns once the thread has finished what it had in hand and takes no more work (at
    /// once if the thread has ended).
    pub fn pause(&self) {
        let number = self.pauses_asked.fetch_add(1, Ordering::SeqCst) + 1;
        self.set(WANT_PAUSE);
        let mut done = lock(&self.pauses_done);
        while *done < number {
            done = match self.pause_done.wait(done) {
                Ok(d) => d,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }

    /// Whether the thread may take more work; a handler checks it between items of a batch.
    pub fn running(&self) -> bool {
        self.want.load(Ordering::SeqCst) == WANT_RUN
    }

    /// For unit tests that drive a handler without a thread: running from the start.
    #[cfg(test)]
    pub fn new_running() -> Self {
        let control = Control::new().expect("an eventfd for a test");
        control.want.store(WANT_RUN, Ordering::SeqCst);
        control
    }

    /// Called by the thread when it is paused: every pause asked so far is done.
    fn acknowledge_pauses(&self) {
        let asked = self.pauses_asked.load(Ordering::SeqCst);
        let mut done = lock(&self.pauses_done);
        if *done < asked {
            *done = asked;
            self.pause_done.notify_all();
        }
    }

    /// The thread ends: no pause waits for it any more.
    fn acknowledge_all(&self) {
        *lock(&self.pauses_done) = u64::MAX;
        self.pause_done.notify_all();
    }
}

/// What a device's I/O thread watches and does. Every method runs on the thread.
pub trait IoHandler: Send + 'static {
    /// Names the device in log lines ("virtio-net n0").
    fn name(&self) -> String;
    /// Adds the device's fds to `epoll`, with tokens other than [`TOKEN_WAKE`].
    fn register(&mut self, epoll: &Epoll) -> std::io::Result<()>;
    /// One of its fds is ready (the thread may be paused): take the event (read the eventfd,
    /// reap the completions); the work itself waits for [`IoHandler::work`].
    fn event(&mut self, epoll: &Epoll, token: u64);
    /// The thread was paused and runs again (its first run too): called before `work`.
    fn resume(&mut self, _epoll: &Epoll) {}
    /// Running: do everything there is to do (after a resume and after every wake-up, since
    /// notifications may have come while paused). Stops early once `Control::running` is false.
    fn work(&mut self, epoll: &Epoll);
    /// Pausing: finish what is in hand; the pause completes when this returns.
    fn pause(&mut self, _epoll: &Epoll) {}
    /// The thread ends (stop, or an epoll failure): finish what is in flight.
    fn stop(&mut self) {}
}

/// A running I/O thread; stopped and joined on drop.
pub struct Worker {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread `name` running `handler`, paused, steered through `control` (which
    /// the handler may hold too, for [`Control::running`]).
    pub fn spawn<H: IoHandler>(
        name: String,
        control: Arc<Control>,
        mut handler: H,
    ) -> std::io::Result<Self> {
        let thread_control = control.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(&thread_control, &mut handler))?;
        Ok(Worker {
            control,
            thread: Some(thread),
        })
    }

    /// See [`Control::pause`].
    pub fn pause(&self) {
        self.control.pause();
    }

    pub fn resume(&self) {
        self.control.resume();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.control.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread's loop: commands at the top (a pause never starts more work), then events.
pub fn run<H: IoHandler>(control: &Control, handler: &mut H) {
    let epoll = match setup(control, handler) {
        Ok(e) => e,
        Err(e) => {
            log::error!("{}: epoll: {e}; the device does not work", handler.name());
            handler.stop();
            control.acknowledge_all();
            return;
        }
    };
    let mut running = false;
    let mut resumes_seen = 0;
    let mut events = [EpollEvent::default(); 8];
    loop {
        if control.want.load(Ordering::SeqCst) == WANT_STOP {
            break;
        }
        let asked = control.resumes_asked.load(Ordering::SeqCst);
        let resumed = asked != resumes_seen;
        resumes_seen = asked;
        if resumed || control.running() {
            if !running {
                running = true;
                handler.resume(&epoll);
            }
            handler.work(&epoll);
        }
        match control.want.load(Ordering::SeqCst) {
            WANT_STOP => break,
            WANT_RUN => {}
            _ => {
                running = false;
                handler.pause(&epoll);
                control.acknowledge_pauses();
            }
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("{}: epoll_wait: {e}", handler.name());
                break;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_WAKE => {
                    let _ = control.wake.read();
                }
                token => handler.event(&epoll, token),
            }
        }
    }
    handler.stop();
    control.acknowledge_all();
}

fn setup<H: IoHandler>(control: &Control, handler: &mut H) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        control.wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_WAKE),
    )?;
    handler.register(&epoll)?;
    Ok(epoll)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Counts what the loop asks of it; `work` takes one item from `queued` per call and
    /// notices a pause between items.
    struct Counter {
        control: Arc<Control>,
        notify: Arc<EventFd>,
        queued: Arc<AtomicU64>,
        done: Arc<AtomicU64>,
        resumes: Arc<AtomicU64>,
        pauses: Arc<AtomicU64>,
        stopped: Arc<AtomicBool>,
    }

    impl IoHandler for Counter {
        fn name(&self) -> String {
            "counter".into()
        }
        fn register(&mut self, epoll: &Epoll) -> std::io::Result<()> {
            epoll.ctl(
                ControlOperation::Add,
                self.notify.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 1),
            )
        }
        fn event(&mut self, _epoll: &Epoll, token: u64) {
            assert_eq!(token, 1);
            let _ = self.notify.read();
        }
        fn resume(&mut self, _epoll: &Epoll) {
            self.resumes.fetch_add(1, Ordering::SeqCst);
        }
        fn work(&mut self, _epoll: &Epoll) {
            while self.control.running() && self.queued.load(Ordering::SeqCst) > 0 {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                self.done.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn pause(&mut self, _epoll: &Epoll) {
            self.pauses.fetch_add(1, Ordering::SeqCst);
        }
        fn stop(&mut self) {
            self.stopped.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_thread_starts_paused_resumes_works_pauses_and_stops() {
        let control = Arc::new(Control::new().unwrap());
        let notify = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let counters: [Arc<AtomicU64>; 4] = Default::default();
        let [queued, done, resumes, pauses] = counters.clone();
        let stopped = Arc::new(AtomicBool::new(false));
        let handler = Counter {
            control: control.clone(),
            notify: notify.clone(),
            queued: queued.clone(),
            done: done.clone(),
            resumes: resumes.clone(),
            pauses: pauses.clone(),
            stopped: stopped.clone(),
        };
        let worker = Worker::spawn("worker-test".into(), control.clone(), handler).unwrap();
        // Paused from the start: work queued and notified is left alone.
        worker.pause();
        queued.store(3, Ordering::SeqCst);
        notify.write(1).unwrap();
        worker.pause();
        assert_eq!(done.load(Ordering::SeqCst), 0);
        assert_eq!(resumes.load(Ordering::SeqCst), 0);
        // Resumed: the queued work is done without another notification.
        worker.resume();
        while done.load(Ordering::SeqCst) < 3 {
            std::thread::yield_now();
        }
        // A notification while running is worked on.
        queued.store(2, Ordering::SeqCst);
        notify.write(1).unwrap();
        while done.load(Ordering::SeqCst) < 5 {
            std::thread::yield_now();
        }
        worker.pause();
        assert_eq!(resumes.load(Ordering::SeqCst), 1);
        assert!(pauses.load(Ordering::SeqCst) >= 2);
        // A resume followed at once by a pause still makes its pass.
        worker.resume();
        worker.pause();
        assert_eq!(resumes.load(Ordering::SeqCst), 2);
        drop(worker);
        assert!(
            stopped.load(Ordering::SeqCst),
            "the handler was told to stop"
        );
        // The thread has ended: a pause does not wait for it.
        control.pause();
    }
}
