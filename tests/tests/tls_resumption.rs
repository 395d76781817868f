//! A proxy that first reached the control plane before it had a certificate must present
//! its certificate once it has one. A resumed TLS session carries the identity of the
//! session it resumes, none here, so the client must not resume.

use std::sync::Arc;
use std::time::Duration;

use outrigger_control_plane::ca::Ca;
use outrigger_control_plane::secure_xds;
use outrigger_core::spiffe::SpiffeId;
use outrigger_proxy::identity::mtls;
use outrigger_proxy::identity::store::IdentityStore;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Accepts TLS connections and reports, for each, whether its client sent a certificate.
async fn server(
    ca: &Ca,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<bool>,
) {
    let config = secure_xds::server_config(ca, &[]).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let _ = tx.send(tls.get_ref().1.peer_certificates().is_some());
            // A byte back, so that the client reads the session tickets sent with it.
            let _ = tls.write_all(b"x").await;
            let _ = tls.flush().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (addr, rx)
}

async fn call(config: Arc<rustls::ClientConfig>, addr: std::net::SocketAddr) {
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await.unwrap();
}

#[tokio::test]
async fn a_certificate_that_arrives_after_a_first_call_is_presented_on_the_next() {
    let ca = Ca::generate("mesh.test").unwrap();
    let (addr, mut seen) = server(&ca).await;
    let store = Arc::new(IdentityStore::default());
    store.set_bundle(ca.bundle_pem().as_bytes()).unwrap();
    let expected = SpiffeId::control_plane("mesh.test");
    let config = mtls::client_config(store.clone(), vec![expected], mtls::ALPN_H2);

    // As a proxy does at start: the control plane is reached before the certificate exists.
    call(config.clone(), addr).await;
    assert!(!seen.recv().await.unwrap(), "no certificate yet");

    let id = SpiffeId::new("mesh.test", "default", "b");
    let (chain, key) = ca.issue(&id, Duration::from_secs(3600)).unwrap();
    store
        .set_certificate(chain.as_bytes(), key.as_bytes())
        .unwrap();
    for _ in 0..3 {
        call(config.clone(), addr).await;
        assert!(
            seen.recv().await.unwrap(),
            "a connection made with a certificate in the store must present it"
        );
    }
}
