//! "Pods" on one machine: a network namespace each, joined by veth pairs to a bridge in the
//! host namespace, on a private /24 that exists only inside this test.
//!
//! Needs root, `ip` (iproute2) and `iptables`; `scripts/test` installs them. Everything is
//! named after the test process and torn down on drop, even when the test panics.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// `fd00:250:<subnet>::<11 + n>`: every pod is dual-stack.
    pub ip6: Ipv6Addr,
    /// The host end of the pod's veth pair: everything the pod sends or receives crosses it.
    pub host_interface: String,
}

pub struct PodNetwork {
    bridge: String,
    /// The host's address on the bridge: where the control plane listens.
    pub gateway: Ipv4Addr,
    pub pods: Vec<Pod>,
    children: Vec<Child>,
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl PodNetwork {
    /// One pod per name, on `10.250.<subnet>.0/24`: the bridge is `.1`, pods `.11` on.
    pub fn new(subnet: u8, names: &[&str]) -> PodNetwork {
        remove_leftovers();
        let id = std::process::id();
        let bridge = format!("orb{id}");
        let gateway = Ipv4Addr::new(10, 250, subnet, 1);
        let mut net = PodNetwork {
            bridge: bridge.clone(),
            gateway,
            pods: Vec::new(),
            children: Vec::new(),
        };
        run("ip", &["link", "add", &bridge, "type", "bridge"]);
        run(
            "ip",
            &["addr", "add", &format!("{gateway}/24"), "dev", &bridge],
        );
        let gateway6 = Ipv6Addr::new(0xfd00, 0x250, subnet as u16, 0, 0, 0, 0, 1);
        // nodad: the address is usable at once instead of after duplicate detection.
        run(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{gateway6}/64"),
                "dev",
                &bridge,
                "nodad",
            ],
        );
        run("ip", &["link", "set", &bridge, "up"]);
        for (i, name) in names.iter().enumerate() {
            let netns = format!("or{id}-{name}");
            let ip = Ipv4Addr::new(10, 250, subnet, 11 + i as u8);
            let ip6 = Ipv6Addr::new(0xfd00, 0x250, subnet as u16, 0, 0, 0, 0, 0x11 + i as u16);
            let (host_end, pod_end) = (format!("orh{id}{i}"), format!("orp{id}{i}"));
            run("ip", &["netns", "add", &netns]);
            net.pods.push(Pod {
                name: name.to_string(),
                netns: netns.clone(),
                ip,
                ip6,
                host_interface: host_end.clone(),
            });
            run(
                "ip",
                &[
                    "link", "add", &host_end, "type", "veth", "peer", "name", &pod_end,
                ],
            );
            run("ip", &["link", "set", &host_end, "master", &bridge, "up"]);
            run("ip", &["link", "set", &pod_end, "netns", &netns]);
            let inside = |args: &[&str]| {
                let mut all = vec!["netns", "exec", &netns, "ip"];
                all.extend_from_slice(args);
                run("ip", &all);
            };
            inside(&["link", "set", "lo", "up"]);
            inside(&["link", "set", &pod_end, "name", "eth0"]);
            inside(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            inside(&["link", "set", "eth0", "up"]);
            // Service VIPs are reachable only through the gateway, as with kube-proxy.
            inside(&["route", "add", "default", "via", &gateway.to_string()]);
            inside(&[
                "-6",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            inside(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gateway6.to_string(),
            ]);
        }
        net
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("no such pod")
    }

    /// Runs a command inside a pod and waits for it.
    pub fn exec(&self, pod: &str, program: &str, args: &[&str]) -> Output {
        let netns = &self.pod(pod).netns;
        Command::new("ip")
            .args(["netns", "exec", netns, program])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// Starts a long-running process inside a pod, as `uid` when given; it is killed when
    /// the network is dropped. Its output goes to `log`.
    pub fn spawn(&mut self, pod: &str, uid: Option<u32>, argv: &[&str], log: &Path) {
        let netns = self.pod(pod).netns.clone();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &netns]);
        if let Some(uid) = uid {
            let (u, g) = (format!("--reuid={uid}"), format!("--regid={uid}"));
            cmd.args(["setpriv", &u, &g, "--clear-groups"]);
        }
        let log = std::fs::File::create(log).unwrap();
        let child = cmd
            .args(argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn in pod");
        self.children.push(child);
    }
}

/// A test killed outright (a timeout) never ran its drop: take away what a dead test process
/// left, so that its subnet cannot shadow a live one.
fn remove_leftovers() {
    let dead = |name: &str, prefix: &str| {
        let pid = name
            .strip_prefix(prefix)?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .to_string();
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    };
    let links = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output();
    for line in String::from_utf8_lossy(&links.map(|o| o.stdout).unwrap_or_default()).lines() {
        if let Some(name) = line.split(':').nth(1).map(str::trim)
            && dead(name, "orb").is_some()
        {
            let _ = Command::new("ip").args(["link", "del", name]).output();
        }
    }
    let netns = Command::new("ip").args(["netns", "list"]).output();
    for line in String::from_utf8_lossy(&netns.map(|o| o.stdout).unwrap_or_default()).lines() {
        if let Some(name) = line.split_whitespace().next()
            && dead(name, "or").is_some()
        {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pod in &self.pods {
            let _ = Command::new("ip")
                .args(["netns", "del", &pod.netns])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}
