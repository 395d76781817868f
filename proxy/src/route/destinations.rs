//! Which service a redirected connection is for.
//!
//! With the `init` rules in place the app connects to a service address and lands on the
//! outbound listener; `net::original_dst` reads back the address it asked for. This table
//! maps it to a service through the config the control plane sent: a virtual host that names
//! the address (a service VIP, `ip:port`), or a cluster that has it as an endpoint. An address
//! that is no service of the mesh is passed through untouched, as TCP, to where the app meant
//! it to go.
//!
//! Inbound, the original destination is the pod's own address, and its port says which of
//! the app's ports the caller wanted: a virtual host with the domain `:PORT` serves it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::cluster::balance::Cluster;
use crate::route::table::VirtualHost;

/// Original destination → service, rebuilt with every config.
#[derive(Default)]
pub struct Destinations {
    virtual_hosts: HashMap<SocketAddr, u32>,
    clusters: HashMap<SocketAddr, Arc<Cluster>>,
    /// Inbound: the app port a connection was for (domain `:PORT`) → its virtual host.
    ports: HashMap<u16, Service>,
}

/// The service a redirected connection is for: the virtual host that routes its HTTP when
/// the Host header names none, and the cluster its opaque TCP goes to.
#[derive(Default, Clone)]
pub struct Service {
    /// An index into the listener's virtual hosts (`u32`: carried by every connection).
    pub virtual_host: Option<u32>,
    pub cluster: Option<Arc<Cluster>>,
}

impl Destinations {
    /// VIPs are the virtual hosts' `ip:port` domains. Endpoint addresses map to the virtual
    /// host whose routes lead to their cluster, so an app that dials a pod directly is still
    /// routed (and retried, and secured) like one that dials the service.
    pub fn new(virtual_hosts: &[VirtualHost], clusters: &HashMap<String, Arc<Cluster>>) -> Self {
        let mut index = Destinations::default();
        for (i, vh) in (0u32..).zip(virtual_hosts) {
            let first_cluster = vh
                .routes
                .first()
                .and_then(|r| r.backends.first())
                .map(|b| b.cluster.clone());
            for domain in &vh.domains {
                if let Some(port) = domain.strip_prefix(':').and_then(|p| p.parse().ok()) {
                    index.ports.entry(port).or_insert_with(|| Service {
                        virtual_host: Some(i),
                        cluster: first_cluster.clone(),
                    });
                }
                if let Ok(addr) = domain.parse::<SocketAddr>() {
                    index.virtual_hosts.entry(addr).or_insert(i);
                    if let Some(c) = &first_cluster {
                        index.clusters.entry(addr).or_insert_with(|| c.clone());
                    }
                }
            }
            for backend in vh.routes.iter().flat_map(|r| &r.backends) {
                for e in &backend.cluster.endpoints {
                    index.virtual_hosts.entry(e.addr).or_insert(i);
                }
            }
        }
        // Sorted, so that an endpoint shared by two clusters always maps to the same one.
        let mut names: Vec<&String> = clusters.keys().collect();
        names.sort();
        for name in names {
            let cluster = &clusters[name];
            for e in &cluster.endpoints {
                index
                    .clusters
                    .entry(e.addr)
                    .or_insert_with(|| cluster.clone());
            }
        }
        index
    }

    /// Inbound, the address is the pod's own and only the port tells the apps apart.
    pub fn lookup_port(&self, port: u16) -> Service {
        self.ports.get(&port).cloned().unwrap_or_default()
    }

    /// Outbound: `None` when the address is no service of the mesh (it is passed through).
    pub fn lookup(&self, addr: SocketAddr) -> Option<Service> {
        let virtual_host = self.virtual_hosts.get(&addr).copied();
        let cluster = self.clusters.get(&addr).cloned();
        (virtual_host.is_some() || cluster.is_some()).then_some(Service {
            virtual_host,
            cluster,
        })
    }
}
