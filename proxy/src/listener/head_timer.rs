//! hyper's timer for one HTTP/1.1 connection, which it uses for the header-read timeout.
//!
//! hyper asks for a new timer for every request head, and drops it once the head is read:
//! with tokio's timer, each request registered an entry in the timer wheel and removed it
//! again, and boxed a new `Sleep`. Here every head of a connection shares one [`Alarm`]. It is
//! moved only when it would go off too late for the head now being read; one that goes off
//! early (for a head read long ago) is set again to the current head's deadline. A busy
//! connection's timer is moved about once per timeout rather than twice per request.
//!
//! This relies on an HTTP/1.1 connection reading one head at a time: a head's deadline is
//! never earlier than one read before it, except as `sleep_until` allows for.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::rt::{Sleep, Timer};

use crate::net::alarm::Alarm;

/// One connection's shared timer, made at the first head. Only that connection's task takes
/// the lock, so it is never waited on.
#[allow(clippy::disallowed_types)]
type Shared = Arc<std::sync::Mutex<Option<Pin<Box<Alarm>>>>>;

/// The `Timer` to give hyper's HTTP/1.1 builder, one per connection.
pub struct HeadTimer {
    alarm: Shared,
}

impl HeadTimer {
    /// A timer with no alarm yet: a resting connection's builder holds one of these, a few
    /// words. Its alarm is made at the first head, inside the runtime.
    pub fn new() -> HeadTimer {
        HeadTimer {
            alarm: Arc::new(None.into()),
        }
    }
}

/// The shared alarm, set to go off no later than `deadline`.
fn no_later_than(
    alarm: &mut Option<Pin<Box<Alarm>>>,
    deadline: tokio::time::Instant,
) -> Pin<&mut Alarm> {
    let alarm = alarm.get_or_insert_with(|| Box::pin(Alarm::at(deadline)));
    if alarm.deadline() > deadline {
        alarm.as_mut().reset(deadline);
    }
    alarm.as_mut()
}

/// One head's deadline.
struct HeadSleep {
    alarm: Shared,
    deadline: tokio::time::Instant,
}

impl Timer for HeadTimer {
    fn sleep(&self, duration: std::time::Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    /// tokio's clock, which its timers go by (and which tests can pause).
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        // The shared alarm must go off no later than any head's deadline.
        no_later_than(
            &mut self.alarm.lock().unwrap_or_else(PoisonError::into_inner),
            deadline,
        );
        Box::pin(HeadSleep {
            alarm: self.alarm.clone(),
            deadline,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(head) => {
                let head = head.get_mut();
                head.deadline = tokio::time::Instant::from_std(new_deadline);
                no_later_than(
                    &mut head.alarm.lock().unwrap_or_else(PoisonError::into_inner),
                    head.deadline,
                );
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        let mut shared = self.alarm.lock().unwrap_or_else(PoisonError::into_inner);
        let mut alarm = no_later_than(&mut shared, deadline);
        loop {
            if alarm.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if alarm.deadline() >= deadline {
                return Poll::Ready(());
            }
            // It went off for an earlier head: now it waits for this one.
            alarm.as_mut().reset(deadline);
        }
    }
}

impl Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn each_head_gets_its_own_deadline_from_the_one_alarm() {
        let timer = HeadTimer::new();
        let start = tokio::time::Instant::now();
        let mut first = timer.sleep(Duration::from_secs(30));
        // A head read in time: waited on, then dropped before its deadline, with the alarm
        // left set for 30 s.
        let waited = tokio::time::timeout(Duration::from_secs(10), &mut first).await;
        assert!(waited.is_err());
        drop(first);
        let second = timer.sleep(Duration::from_secs(30));
        second.await;
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(40),
            "not at the first's 30 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_moves_the_alarm_forward() {
        let timer = HeadTimer::new();
        let start = tokio::time::Instant::now();
        let long = timer.sleep(Duration::from_secs(60));
        let short = timer.sleep(Duration::from_secs(5));
        short.await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        long.await;
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_head_goes_off_at_its_new_deadline() {
        let timer = HeadTimer::new();
        let start = tokio::time::Instant::now();
        let mut sleep = timer.sleep(Duration::from_secs(30));
        timer.reset(&mut sleep, (start + Duration::from_secs(3)).into_std());
        sleep.await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }
}
