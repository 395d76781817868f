//! The Outrigger control plane: a mesh file in, Envoy xDS v3 out.
#![forbid(unsafe_code)]

pub mod admission;
pub mod ads;
pub mod ads_delta;
pub mod ads_stream;
pub mod ads_transport;
pub mod app;
pub mod authorization;
pub mod ca;
pub mod cluster_health;
pub mod cluster_source;
pub mod cluster_watch;
pub mod gateway_api;
pub mod gateway_routes;
pub mod graph_api;
pub mod grpc_limits;
pub mod identity_service;
pub mod inbound_policy;
pub mod inject;
pub mod kube_client;
pub mod lease;
pub mod load_reporting;
pub mod mesh;
pub mod mesh_source;
pub mod node_status;
pub mod policy;
pub mod policy_attachment;
pub mod resilience_policy;
pub mod route_status;
pub mod secure_xds;
pub mod service_graph;
pub mod snapshot;
pub mod token_review;
pub mod translate;
pub mod xds_limits;
