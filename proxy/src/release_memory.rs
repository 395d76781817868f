//! Gives the system back the memory the allocator holds free, after quiet connections have
//! given back their buffers or a config was built.
//!
//! glibc keeps freed memory in its arenas and returns it to the system only from the top of
//! a heap. The buffers that quiet keep-alive connections give back (`listener::rest`), and
//! what building a config allocated and dropped (the file's parsed form, the old snapshot),
//! lie between allocations that live on, so without this they would stay resident: free to
//! the proxy, but not to the node. `malloc_trim` hands back every whole free page.

use std::time::Duration;

use outrigger_proxy::config::store::accepted_configs;
use outrigger_proxy::listener::rest::rested_connections;

/// How often to look for rests or new configs since the last trim. A trim walks every arena
/// under its lock, so it runs only when one of them happened since the last one. The first
/// look is at once, after the first config was built.
const EVERY: Duration = Duration::from_secs(2);

pub async fn after_frees() {
    let mut seen = (0, 0);
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = (rested_connections(), accepted_configs());
        if now != seen {
            seen = now;
            trim();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim takes no pointers and changes only glibc's own free lists, under
    // each arena's lock.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl's, jemalloc) return free pages on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
