//! Timers that are cheap to poll while they have not gone off.
//!
//! A connection or request task polls its timers every time it is woken, which is several
//! times per request, while the timers themselves almost never fire. tokio's `Sleep` does its
//! whole poll each time (the coop budget, the driver check, the waker's registration): about
//! a hundred instructions. Once a `Sleep` is registered with the waker of the task that polls
//! it, the timer wakes that task when it fires, and until then `is_elapsed` says so in one
//! atomic load. An [`Alarm`] polls its `Sleep` only to register it, again when the waker
//! changes, and when it has gone off.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pin_project! {
    /// A `Sleep` that skips its poll while it is registered with the current waker and has
    /// not gone off.
    pub struct Alarm {
        #[pin]
        sleep: Sleep,
        // The waker the `Sleep` was last registered with; `None` until it is.
        armed: Option<Waker>,
    }
}

impl Alarm {
    /// An alarm that goes off at `deadline`.
    pub fn at(deadline: Instant) -> Alarm {
        Alarm {
            sleep: tokio::time::sleep_until(deadline),
            armed: None,
        }
    }

    /// An alarm that goes off `after` from now.
    pub fn after(after: Duration) -> Alarm {
        Alarm {
            sleep: tokio::time::sleep(after),
            armed: None,
        }
    }

    /// When it goes off.
    pub fn deadline(&self) -> Instant {
        self.sleep.deadline()
    }

    /// Sets it to go off at `deadline` instead, whether or not it has gone off already.
    pub fn reset(self: Pin<&mut Self>, deadline: Instant) {
        let this = self.project();
        this.sleep.reset(deadline);
        *this.armed = None;
    }
}

impl Future for Alarm {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if let Some(waker) = this.armed.as_ref()
            && waker.will_wake(cx.waker())
            && !this.sleep.is_elapsed()
        {
            return Poll::Pending;
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => {
                *this.armed = None;
                Poll::Ready(())
            }
            Poll::Pending => {
                match this.armed {
                    Some(waker) => waker.clone_from(cx.waker()),
                    None => *this.armed = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

/// `inner`, cut off at `deadline`: `Err(Elapsed)` if it has not finished by then. As
/// `tokio::time::timeout_at`, with the timer polled as an [`Alarm`].
pub fn within<F: Future>(deadline: Instant, inner: F) -> Within<F> {
    Within {
        inner,
        alarm: Alarm::at(deadline),
    }
}

pin_project! {
    /// The future of [`within`].
    pub struct Within<F> {
        #[pin]
        inner: F,
        #[pin]
        alarm: Alarm,
    }
}

/// The deadline of [`within`] passed first.
#[derive(Debug, PartialEq, Eq)]
pub struct Elapsed;

impl<F: Future> Future for Within<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        this.alarm.poll(cx).map(|()| Err(Elapsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    #[tokio::test(start_paused = true)]
    async fn goes_off_at_its_deadline_and_not_before() {
        let started = Instant::now();
        Alarm::after(Duration::from_secs(3)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_alarm_goes_off_at_its_new_deadline() {
        let started = Instant::now();
        let alarm = Alarm::after(Duration::from_secs(1));
        tokio::pin!(alarm);
        // Registered first, so that the reset must undo a registration.
        assert!(poll_once(alarm.as_mut()).await.is_pending());
        alarm.as_mut().reset(started + Duration::from_secs(5));
        alarm.as_mut().await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        alarm.as_mut().reset(started + Duration::from_secs(7));
        alarm.await;
        assert_eq!(started.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn within_cuts_off_a_slow_future_and_passes_a_quick_one() {
        let started = Instant::now();
        let slow = within(
            started + Duration::from_secs(2),
            tokio::time::sleep(Duration::from_secs(10)),
        );
        assert_eq!(slow.await, Err(Elapsed));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let quick = within(started + Duration::from_secs(60), async { 7 });
        assert_eq!(quick.await, Ok(7));
    }

    /// Counts its wakes.
    struct Counter(AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_waker_is_the_one_woken() {
        let alarm = Alarm::after(Duration::from_secs(1));
        tokio::pin!(alarm);
        let first = Arc::new(Counter(AtomicUsize::new(0)));
        let second = Arc::new(Counter(AtomicUsize::new(0)));
        let poll_with = |alarm: Pin<&mut Alarm>, counter: &Arc<Counter>| {
            let waker = Waker::from(counter.clone());
            alarm.poll(&mut Context::from_waker(&waker))
        };
        assert!(poll_with(alarm.as_mut(), &first).is_pending());
        // Polled from elsewhere: the skip must not keep the first waker registered.
        assert!(poll_with(alarm.as_mut(), &second).is_pending());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            second.0.load(Ordering::SeqCst),
            1,
            "the latest waker is woken"
        );
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert!(poll_with(alarm.as_mut(), &second).is_ready());
    }

    /// Polls once with the test task's waker.
    async fn poll_once(mut alarm: Pin<&mut Alarm>) -> Poll<()> {
        std::future::poll_fn(|cx| Poll::Ready(alarm.as_mut().poll(cx))).await
    }
}
