//! futures-timer 3's [`Delay`] on tokio's timer, patched in for the crates.io `futures-timer`
//! (root `Cargo.toml`, `[patch.crates-io]`).
//!
//! libp2p's crates time everything with `futures_timer::Delay`: a stream negotiation, a request,
//! a ping, every gossipsub message queued for a peer, a connection's idle timeout. The original
//! keeps all of them in one global heap served by its own thread, and creating or resetting a
//! delay wakes that thread (a futex wake and a context switch). With hundreds of connections on
//! two cores that thread and its wake-ups took about a tenth of the CPU of a simulation. Here a
//! delay is a [`tokio::time::Sleep`] on the runtime's timer wheel, which the worker threads
//! drive themselves.
//!
//! The API is the part of futures-timer 3 that libp2p uses: [`Delay::new`], [`Delay::reset`]
//! and `Future<Output = ()>`. The sleep is created on the first poll, so a delay may be made
//! outside a runtime (a behaviour built before the swarm runs); it must be polled inside a
//! tokio runtime with the timer enabled, which every meshchat swarm is.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

/// A future that completes once its duration has passed (futures-timer's `Delay`).
pub struct Delay {
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Delay {
    /// A delay that completes `dur` from now.
    pub fn new(dur: Duration) -> Delay {
        Delay {
            deadline: deadline_after(dur),
            sleep: None,
        }
    }

    /// Make the delay complete `dur` from now (also after it completed).
    pub fn reset(&mut self, dur: Duration) {
        self.deadline = deadline_after(dur);
        if let Some(sleep) = self.sleep.as_mut() {
            sleep.as_mut().reset(self.deadline);
        }
    }
}

/// `dur` from now, or far in the future where that overflows (as `Duration::MAX` would).
fn deadline_after(dur: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(dur)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

impl Future for Delay {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        self.sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)))
            .as_mut()
            .poll(cx)
    }
}

impl fmt::Debug for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delay")
            .field("deadline", &self.deadline)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: Duration = Duration::from_millis(30);

    #[tokio::test]
    async fn completes_after_its_duration_and_again_after_a_reset() {
        let start = Instant::now();
        let mut delay = Delay::new(STEP);
        (&mut delay).await;
        assert!(start.elapsed() >= STEP);
        let again = Instant::now();
        delay.reset(STEP * 2);
        (&mut delay).await;
        assert!(again.elapsed() >= STEP * 2);
    }

    #[tokio::test]
    async fn a_reset_before_the_first_poll_moves_the_deadline() {
        let start = Instant::now();
        let mut delay = Delay::new(Duration::from_secs(600));
        delay.reset(STEP);
        tokio::time::timeout(Duration::from_secs(60), delay)
            .await
            .expect("the reset deadline, not the first one");
        assert!(start.elapsed() >= STEP);
    }

    #[tokio::test]
    async fn a_reset_after_a_poll_moves_the_deadline_too() {
        let mut delay = Delay::new(Duration::from_secs(600));
        let pending = futures_poll_once(&mut delay).await;
        assert!(pending, "not due yet");
        let start = Instant::now();
        delay.reset(STEP);
        tokio::time::timeout(Duration::from_secs(60), delay)
            .await
            .expect("the reset deadline, not the first one");
        assert!(start.elapsed() >= STEP);
    }

    /// Poll `delay` once; whether it was pending.
    async fn futures_poll_once(delay: &mut Delay) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *delay).poll(cx).is_pending())).await
    }

    #[test]
    fn may_be_made_outside_a_runtime_and_polled_inside_one() {
        let delay = Delay::new(STEP);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(delay);
    }

    #[test]
    fn an_endless_duration_does_not_overflow() {
        let mut delay = Delay::new(Duration::MAX);
        delay.reset(Duration::MAX);
    }

    #[test]
    fn is_send_sync_and_unpin_like_the_original() {
        fn check<T: Send + Sync + Unpin>() {}
        check::<Delay>();
    }
}
