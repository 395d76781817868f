//! The command line's views of the running mesh: `check` (what is wrong, with hints),
//! `proxy-status` (each proxy's config versions and NACKs, as the control plane saw them) and
//! `proxy-config` (one proxy's routes, clusters and endpoints, from its admin port).

use serde_json::Value;

use crate::admin_client::{AdminError, get_json};
use crate::diagnose::Problem;
use crate::stat::Output;

/// The types a proxy is sent, in push order, by the short names `/status` uses.
const TYPES: [(&str, &str); 4] = [
    ("Cluster", "CDS"),
    ("ClusterLoadAssignment", "EDS"),
    ("Listener", "LDS"),
    ("RouteConfiguration", "RDS"),
];

/// `check`: the report, and whether the mesh is healthy.
pub async fn check(admin: &str, output: Output) -> (String, bool) {
    let problems = match get_json(admin, "/check").await {
        Ok(v) => v,
        Err(e) => {
            let unreachable = Problem {
                check: "control-plane".into(),
                subject: admin.into(),
                message: e.to_string(),
                hint: "start it, or pass its admin address with --admin".into(),
            };
            let text = match output {
                Output::Json => json_text(&serde_json::json!({ "problems": [unreachable] })),
                Output::Table => lines(&[unreachable]),
            };
            return (text, false);
        }
    };
    let list: Vec<Problem> =
        serde_json::from_value(problems["problems"].clone()).unwrap_or_default();
    let text = match output {
        Output::Json => json_text(&problems),
        Output::Table if list.is_empty() => format!(
            "ok: {} services, {} proxies connected, no problem found\n",
            problems["services"], problems["proxies_connected"]
        ),
        Output::Table => lines(&list),
    };
    (text, list.is_empty())
}

fn lines(problems: &[Problem]) -> String {
    let mut out = String::new();
    for p in problems {
        out.push_str(&format!(
            "✗ [{}] {}: {}\n    hint: {}\n",
            p.check, p.subject, p.message, p.hint
        ));
    }
    out.push_str(&format!("{} problem(s)\n", problems.len()));
    out
}

/// `proxy-status`: one row per proxy (Envoys and gRPC clients too).
pub async fn proxy_status(admin: &str, output: Output) -> Result<String, AdminError> {
    let status = get_json(admin, "/status").await?;
    let nodes = status["nodes"].as_object().cloned().unwrap_or_default();
    if output == Output::Json {
        return Ok(json_text(&Value::Object(nodes)));
    }
    let mut rows = Vec::new();
    for (id, n) in &nodes {
        let mut row = vec![
            id.clone(),
            n["cluster"].as_str().unwrap_or("-").to_string(),
            if n["connected"] == true {
                "connected".into()
            } else {
                "gone".into()
            },
        ];
        let mut last_nack = String::from("-");
        for (long, _) in TYPES {
            let t = &n["types"][long];
            row.push(type_state(t));
            if let Some(msg) = t["last_nack"]["message"].as_str() {
                last_nack = format!("{long}: {msg}");
            }
        }
        row.push(last_nack);
        rows.push(row);
    }
    let mut header = vec!["NODE", "SERVICE", "STREAM"];
    header.extend(TYPES.iter().map(|(_, short)| *short));
    header.push("LAST NACK");
    Ok(crate::stat::table(&header, rows.into_iter()))
}

/// `SYNCED 7`, `STALE 7/6` (sent, ACKed), `NACKED 7`, or `-` when never sent.
fn type_state(t: &Value) -> String {
    let sent = t["sent_version"].as_str();
    let acked = t["acked_version"].as_str();
    match (sent, acked) {
        (None, _) => "-".into(),
        (Some(s), _) if t["refusing"] == true => format!("NACKED {s}"),
        (Some(s), Some(a)) if s == a => format!("SYNCED {s}"),
        (Some(s), a) => format!("STALE {s}/{}", a.unwrap_or("-")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConfigPart {
    Routes,
    Clusters,
    Endpoints,
}

/// Whose config `proxy-config` shows.
pub enum Source<'a> {
    /// One of our proxies, from its admin `/config`: what it runs, with outlier state.
    Proxy(&'a str),
    /// Any xDS client (an Envoy, a gRPC app), from the control plane at this admin address:
    /// what it is served, beside the versions it ACKed.
    Node { admin: &'a str, node: &'a str },
}

/// `proxy-config`: a part of one proxy's config.
pub async fn proxy_config(
    source: Source<'_>,
    part: ConfigPart,
    output: Output,
) -> Result<String, AdminError> {
    let config = match source {
        Source::Proxy(proxy) => get_json(proxy, "/config").await?,
        Source::Node { admin, node } => {
            let path = format!("/node-config?node={}", outrigger_core::query::encode(node));
            get_json(admin, &path).await?
        }
    };
    let snapshot = &config["snapshot"];
    let empty = Vec::new();
    let listeners = snapshot["listeners"].as_array().unwrap_or(&empty);
    let clusters = snapshot["clusters"].as_array().unwrap_or(&empty);
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let (header, rows, json): (Vec<&str>, Vec<Vec<String>>, Value) = match part {
        ConfigPart::Routes => {
            let mut rows = Vec::new();
            for l in listeners {
                for vh in l["virtual_hosts"].as_array().unwrap_or(&empty) {
                    for r in vh["routes"].as_array().unwrap_or(&empty) {
                        let backends: Vec<String> = r["backends"]
                            .as_array()
                            .unwrap_or(&empty)
                            .iter()
                            .map(|b| format!("{}:{}", s(&b["cluster"]), s(&b["weight"])))
                            .collect();
                        rows.push(vec![
                            s(&l["name"]),
                            s(&vh["name"]),
                            s(&r["name"]),
                            backends.join(","),
                            format!("{}ms", s(&r["timeout_ms"])),
                        ]);
                    }
                }
            }
            (
                vec!["LISTENER", "VIRTUAL HOST", "ROUTE", "BACKENDS", "TIMEOUT"],
                rows,
                Value::Array(listeners.clone()),
            )
        }
        ConfigPart::Clusters => (
            vec!["CLUSTER", "PROTOCOL", "LB", "ENDPOINTS", "EJECTED"],
            clusters
                .iter()
                .map(|c| {
                    let eps = c["endpoints"].as_array().unwrap_or(&empty);
                    let ejected = eps.iter().filter(|e| e["ejected"] == true).count();
                    vec![
                        s(&c["name"]),
                        s(&c["protocol"]),
                        s(&c["lb"]),
                        eps.len().to_string(),
                        ejected.to_string(),
                    ]
                })
                .collect(),
            Value::Array(clusters.clone()),
        ),
        ConfigPart::Endpoints => {
            let mut rows = Vec::new();
            for c in clusters {
                for e in c["endpoints"].as_array().unwrap_or(&empty) {
                    rows.push(vec![
                        s(&c["name"]),
                        s(&e["address"]),
                        match &e["ejected"] {
                            Value::Bool(true) => "EJECTED".into(),
                            Value::Bool(false) => "HEALTHY".into(),
                            _ => "-".into(),
                        },
                        s(&e["ejections"]),
                        s(&e["outstanding"]),
                        e["latency_estimate_ms"]
                            .as_f64()
                            .map_or("-".into(), |ms| format!("{ms:.2}ms")),
                    ]);
                }
            }
            (
                vec![
                    "CLUSTER",
                    "ENDPOINT",
                    "OUTLIER",
                    "EJECTIONS",
                    "IN FLIGHT",
                    "LATENCY",
                ],
                rows,
                Value::Array(clusters.clone()),
            )
        }
    };
    Ok(match output {
        Output::Json => json_text(&json),
        Output::Table => crate::stat::table(&header, rows.into_iter()),
    })
}

fn json_text(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_type_reads_as_synced_stale_or_nacked() {
        assert_eq!(type_state(&json!({})), "-");
        assert_eq!(
            type_state(&json!({"sent_version": "7", "acked_version": "7"})),
            "SYNCED 7"
        );
        assert_eq!(
            type_state(&json!({"sent_version": "7", "acked_version": "6"})),
            "STALE 7/6"
        );
        assert_eq!(
            type_state(&json!({"sent_version": "7", "acked_version": "6", "refusing": true})),
            "NACKED 7"
        );
    }
}
