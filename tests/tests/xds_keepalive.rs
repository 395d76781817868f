//! A control plane that goes silent without closing anything (a dead node, a dropped
//! route): the proxy's HTTP/2 keepalive notices within 30 s, counts it, and reconnects.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use outrigger_tests::clients::get;
use outrigger_tests::{TestProxy, control_plane, eventually, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP relay to `to`. `freeze()` turns every connection open at that moment into a black
/// hole: held open, nothing forwarded either way. Later connections are relayed as usual.
struct Relay {
    addr: SocketAddr,
    frozen_before: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
}

/// Copies `from` to `to` while `alive` says so; then holds both open and says nothing (also
/// when the peer closes, which a black hole would not pass on either).
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    alive: impl Fn() -> bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || !alive() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    std::future::pending::<()>().await;
    drop((from, to));
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen_before = Arc::new(AtomicU64::new(0));
        let frozen = frozen_before.clone();
        let generation = Arc::new(AtomicU64::new(0));
        let counter = generation.clone();
        tokio::spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    continue;
                };
                let born = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let frozen = frozen.clone();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(to).await else {
                        return;
                    };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    let alive = move || frozen.load(Ordering::SeqCst) < born;
                    let (one, other) = (forward(dr, uw, alive.clone()), forward(ur, dw, alive));
                    tokio::join!(one, other);
                });
            }
        });
        Relay {
            addr,
            frozen_before,
            generation,
        }
    }

    /// Connections accepted so far.
    fn connections(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Black-holes every connection made so far.
    fn freeze(&self) {
        // A connection is alive while the frozen mark is below its birth number.
        let now = self.generation.load(Ordering::SeqCst);
        self.frozen_before.store(now, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_control_plane_is_noticed_and_redialled() {
    let cp = control_plane(
        r#"services:
  - name: web
    endpoints: [{address: "127.0.0.1:9"}]
"#,
    )
    .await;
    let relay = Relay::start(cp.xds_addr).await;
    let proxy = TestProxy::start(&outrigger_tests::xds_config(&format!(
        "address: \"{}\"\nnode: silent-test\nservice: client",
        relay.addr
    )))
    .await;
    let admin = proxy.admin();
    eventually(
        "the proxy has its config",
        Duration::from_secs(10),
        || async move { (get(admin, "/ready").await.status == 200).then_some(()) },
    )
    .await;
    let reconnects = || async move {
        metric(
            &get(admin, "/metrics").await.body,
            "outrigger_xds_reconnects_total",
        )
    };
    assert_eq!(reconnects().await, 0);

    relay.freeze();
    let frozen_at = relay.connections();
    eventually(
        "the silent stream is noticed and counted",
        Duration::from_secs(30),
        || async move { (reconnects().await >= 1).then_some(()) },
    )
    .await;
    // And redialled: a new connection through the relay, which the control plane serves.
    let relay = &relay;
    eventually(
        "the proxy dials again",
        Duration::from_secs(10),
        || async move { (relay.connections() > frozen_at).then_some(()) },
    )
    .await;
    let cp_admin = cp.admin_addr;
    eventually(
        "the control plane sees the new stream",
        Duration::from_secs(10),
        || async move {
            let status = get(cp_admin, "/status").await.body;
            let json: serde_json::Value = serde_json::from_str(&status).ok()?;
            (json["nodes"]["silent-test"]["connected"] == true).then_some(())
        },
    )
    .await;
}
