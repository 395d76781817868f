//! `outrigger-control-plane tap`: live requests through one proxy, or several (a service's
//! pods), from their admin ports' `/tap`, one line each, filtered in the proxy (so only what
//! is asked for leaves it).

use crate::admin_client::{AdminError, get_lines};

#[derive(Debug, Default, Clone, clap::Args)]
pub struct TapArgs {
    /// A proxy's admin port (reached from where the proxy allows taps: by default its own
    /// pod, so `kubectl port-forward <pod> 15020` first). Repeat it to tap every pod of a
    /// service at once; each line then names its proxy.
    #[arg(long = "proxy", default_value = "127.0.0.1:15020")]
    pub proxies: Vec<String>,
    /// Only paths starting with this.
    #[arg(long)]
    pub path: Option<String>,
    #[arg(long)]
    pub method: Option<String>,
    /// A status (503) or a class (5xx).
    #[arg(long)]
    pub status: Option<String>,
    /// A caller's SPIFFE ID, or its start (spiffe://cluster.local/ns/shop/).
    #[arg(long)]
    pub caller: Option<String>,
    /// Only requests for this host (the service's name as called).
    #[arg(long)]
    pub authority: Option<String>,
    /// Most requests shown per second (the proxy drops the rest and says how many).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Stop after this many requests.
    #[arg(long)]
    pub max: Option<u64>,
    /// `json` passes each request on as one JSON object per line.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: crate::stat::Output,
}

impl TapArgs {
    /// `/tap` with the filters as its query.
    pub fn path_and_query(&self) -> String {
        let mut query = Vec::new();
        let mut add = |key: &str, value: Option<String>| {
            if let Some(v) = value {
                query.push(format!("{key}={}", outrigger_core::query::encode(&v)));
            }
        };
        add("path", self.path.clone());
        add("method", self.method.clone());
        add("status", self.status.clone());
        add("caller", self.caller.clone());
        add("authority", self.authority.clone());
        add("rate", self.rate.map(|r| r.to_string()));
        add("max", self.max.map(|m| m.to_string()));
        if query.is_empty() {
            "/tap".into()
        } else {
            format!("/tap?{}", query.join("&"))
        }
    }
}

/// Streams until `max` requests were shown, or every proxy failed. A proxy ends a tap at its
/// admin port's connection age limit (a minute): the tap then starts again.
pub async fn run(args: &TapArgs) -> Result<(), AdminError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, Result<String, AdminError>)>(64);
    for (i, proxy) in args.proxies.iter().enumerate() {
        let (tx, proxy, path) = (tx.clone(), proxy.clone(), args.path_and_query());
        tokio::spawn(async move {
            loop {
                let sent = get_lines(&proxy, &path, |line| {
                    tx.try_send((i, Ok(line.to_string()))).is_ok() || !tx.is_closed()
                })
                .await;
                if let Err(e) = sent {
                    let _ = tx.send((i, Err(e))).await;
                    return;
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let many = args.proxies.len() > 1;
    let (mut shown, mut failed, mut last_error) = (0u64, 0, None);
    while let Some((i, line)) = rx.recv().await {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                // With one proxy, its error is the command's, printed once at the end.
                if many {
                    eprintln!("tap: {e}");
                }
                failed += 1;
                last_error = Some(e);
                continue;
            }
        };
        let from = &args.proxies[i];
        match args.output {
            crate::stat::Output::Json if many => println!("{}", with_proxy(&line, from)),
            crate::stat::Output::Json => println!("{line}"),
            crate::stat::Output::Table if many => println!("{from}  {}", human(&line)),
            crate::stat::Output::Table => println!("{}", human(&line)),
        }
        if !line.starts_with("{\"dropped\"") {
            shown += 1;
        }
        if args.max.is_some_and(|max| shown >= max) {
            return Ok(());
        }
    }
    match last_error {
        Some(e) if failed == args.proxies.len() => Err(e),
        _ => Ok(()),
    }
}

/// A JSON line with the proxy it came from added.
fn with_proxy(line: &str, proxy: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(mut o)) => {
            o.insert("proxy".into(), proxy.into());
            serde_json::Value::Object(o).to_string()
        }
        _ => line.to_string(),
    }
}

/// One request as a line for people:
/// `inbound  GET 503  12.3ms  api:8080/items  from spiffe://…  trace 4bf9…`.
pub fn human(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    if let Some(n) = v.get("dropped") {
        return format!("({n} requests not shown: over the rate, or the watcher fell behind)");
    }
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    format!(
        "{:<8} {:<6} {} {:>8.2}ms  {}{}  from {}  trace {}",
        s("direction"),
        s("method"),
        v["status"],
        v["latency_ms"].as_f64().unwrap_or(0.0),
        s("authority"),
        s("path"),
        v["caller"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{} (no identity)", s("caller_address"))),
        s("trace_id"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_become_an_encoded_query() {
        let args = TapArgs {
            path: Some("/api items".into()),
            status: Some("5xx".into()),
            caller: Some("spiffe://t/ns/a/".into()),
            max: Some(3),
            ..Default::default()
        };
        assert_eq!(
            args.path_and_query(),
            "/tap?path=%2Fapi%20items&status=5xx&caller=spiffe%3A%2F%2Ft%2Fns%2Fa%2F&max=3"
        );
        assert_eq!(TapArgs::default().path_and_query(), "/tap");
    }

    #[test]
    fn a_request_reads_as_one_line() {
        let line = r#"{"direction":"inbound","method":"GET","authority":"api","path":"/x","status":503,"latency_ms":1.5,"route":"r","caller":null,"caller_address":"127.0.0.1:5","trace_id":null}"#;
        let text = human(line);
        assert!(text.contains("GET") && text.contains("503") && text.contains("api/x"));
        assert!(text.contains("127.0.0.1:5 (no identity)"), "{text}");
        assert!(human(r#"{"dropped":4}"#).contains("4 requests not shown"));
    }
}
