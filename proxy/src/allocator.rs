//! The proxy's memory allocator, and giving the system back what it holds free.
//!
//! The proxy allocates through mimalloc. A request's larger blocks (the boxed retry loop,
//! hyper's 8 KB read buffer on the upstream side, which hyper sets aside anew while the last
//! response's bytes are still held) are past the per-thread cache of glibc's allocator, whose
//! slow path costs more than a thousand instructions per block; mimalloc serves blocks of
//! every size from per-thread pages.
//!
//! Two things keep what it holds small:
//! - Transparent huge pages are off for the process. A 2 MB page made for a few small
//!   blocks would count whole against the pod's memory: with them on, a proxy that had
//!   served nothing held 16.4 MB instead of 8.9, and a quiet keep-alive connection 5.7 KB
//!   instead of 1.3.
//! - After quiet connections have given back their buffers (`listener::rest`), or a config
//!   was built and the old one dropped, free pages are handed back at once rather than at
//!   the allocator's next call on the thread that freed them, which an idle proxy may not
//!   make for a long time.

use std::time::Duration;

use outrigger_proxy::config::store::accepted_configs;
use outrigger_proxy::listener::rest::rested_connections;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process, before its heap grows. The kernel
/// default may be `always`, and then every 2 MB-aligned stretch of the allocator's reserved
/// space that is touched at all would become resident whole.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn no_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes no pointers and changes only this process's flag.
    // It fails only on kernels without it, where there is nothing to turn off.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[cfg(not(target_os = "linux"))]
pub fn no_huge_pages() {}

/// How often to look for rests or new configs since the last release. The first look is at
/// once, after the first config was built.
const EVERY: Duration = Duration::from_secs(2);

pub async fn release_after_frees() {
    let mut seen = (0, 0);
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = (rested_connections(), accepted_configs());
        if now != seen {
            seen = now;
            release();
        }
    }
}

#[allow(unsafe_code)]
fn release() {
    // SAFETY: mi_collect takes no pointers; it returns free pages of this thread's heap and
    // every page the allocator has waiting to be returned.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}
