//! Transparent interception: the iptables rules that send a pod's TCP through its sidecar.
//!
//! Inbound TCP is redirected (nat PREROUTING) to the inbound listener and the app's own
//! outbound TCP (nat OUTPUT) to the outbound listener. The proxy's traffic is matched by its
//! UID and left alone, or it would loop forever. The rules live in chains of their own, so
//! that applying them again replaces them (idempotent) and removing them leaves the tables
//! exactly as they were. They are plain `iptables` commands, so the same rules work with the
//! nft and the legacy backends: the binary chosen decides which.

use std::process::Command;

pub use outrigger_core::cidr::Cidr;

/// Chains this module owns. Everything else in the nat table is someone else's.
const INBOUND_CHAIN: &str = "OUTRIGGER_INBOUND";
const OUTBOUND_CHAIN: &str = "OUTRIGGER_OUTPUT";

#[derive(Debug, Clone, PartialEq)]
pub struct Interception {
    /// The iptables binary: `iptables`, `iptables-nft` or `iptables-legacy`.
    pub iptables: String,
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// The UID the proxy runs as; its connections are never redirected.
    pub proxy_uid: u32,
    /// `Some`: only these inbound ports are redirected (none when empty); `None`: all.
    pub include_inbound_ports: Option<Vec<u16>>,
    /// Inbound ports left alone: the admin port (so that probes reach it) and any the user
    /// lists.
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone: the control plane's xDS port and any the
    /// user lists.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations left alone, as `addr/len`.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Also intercept IPv6, with the matching ip6tables, where the kernel has its nat table.
    pub ipv6: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

impl Interception {
    /// The rules, one iptables argument list each, in the order they are applied: the
    /// chains are (re)made empty and filled, then hooked in.
    pub fn rules(&self) -> Vec<Vec<String>> {
        self.rules_for(Family::V4)
    }

    /// The same rules for one address family: only the CIDRs differ.
    pub fn rules_for(&self, family: Family) -> Vec<Vec<String>> {
        // Every argument is a number, an address or a fixed word: none holds a space.
        let mut rules: Vec<String> = Vec::new();
        let mut add = |rule: String| rules.push(format!("-t nat -A {rule}"));
        // Inbound: everything but the excluded ports goes to the inbound listener.
        for port in &self.exclude_inbound_ports {
            add(format!("{INBOUND_CHAIN} -p tcp --dport {port} -j RETURN"));
        }
        let to_inbound = format!("-j REDIRECT --to-ports {}", self.inbound_port);
        match &self.include_inbound_ports {
            None => add(format!("{INBOUND_CHAIN} -p tcp {to_inbound}")),
            Some(ports) => {
                for port in ports {
                    add(format!(
                        "{INBOUND_CHAIN} -p tcp --dport {port} {to_inbound}"
                    ));
                }
            }
        }
        // Outbound: the proxy's own connections, loopback and the exclusions pass; the app's
        // other TCP goes to the outbound listener.
        let uid = self.proxy_uid;
        add(format!(
            "{OUTBOUND_CHAIN} -m owner --uid-owner {uid} -j RETURN"
        ));
        add(format!("{OUTBOUND_CHAIN} -o lo -j RETURN"));
        for port in &self.exclude_outbound_ports {
            add(format!("{OUTBOUND_CHAIN} -p tcp --dport {port} -j RETURN"));
        }
        for cidr in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| c.addr.is_ipv4() == (family == Family::V4))
        {
            add(format!("{OUTBOUND_CHAIN} -d {cidr} -j RETURN"));
        }
        let to_outbound = format!("-j REDIRECT --to-ports {}", self.outbound_port);
        add(format!("{OUTBOUND_CHAIN} -p tcp {to_outbound}"));
        rules
            .iter()
            .map(|r| r.split_whitespace().map(str::to_string).collect())
            .collect()
    }

    /// The ip6tables that goes with the chosen iptables (same backend).
    pub fn ip6tables(&self) -> String {
        self.iptables.replacen("iptables", "ip6tables", 1)
    }

    /// Installs the rules, replacing any earlier set: running it twice leaves the same
    /// tables as running it once. Returns whether IPv6 is intercepted too: it is skipped
    /// where ip6tables has no nat table (a kernel or pod without IPv6).
    pub fn apply(&self) -> Result<bool, InterceptError> {
        self.apply_family(&self.iptables, Family::V4)?;
        let v6 = self.ip6tables();
        if !self.ipv6
            || self
                .run(&v6, &["-t", "nat", "-L", "PREROUTING", "-n"])
                .is_err()
        {
            return Ok(false);
        }
        self.apply_family(&v6, Family::V6)?;
        Ok(true)
    }

    fn apply_family(&self, binary: &str, family: Family) -> Result<(), InterceptError> {
        for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
            if self.run(binary, &["-t", "nat", "-L", chain, "-n"]).is_ok() {
                self.run(binary, &["-t", "nat", "-F", chain])?;
            } else {
                self.run(binary, &["-t", "nat", "-N", chain])?;
            }
        }
        for rule in self.rules_for(family) {
            let args: Vec<&str> = rule.iter().map(String::as_str).collect();
            self.run(binary, &args)?;
        }
        for (hook, chain) in hooks() {
            let jump = ["-t", "nat", "-C", hook, "-p", "tcp", "-j", chain];
            if self.run(binary, &jump).is_err() {
                self.run(binary, &["-t", "nat", "-A", hook, "-p", "tcp", "-j", chain])?;
            }
        }
        Ok(())
    }

    /// Takes out everything `apply` put in, for both families; rules that are already gone
    /// (or were never there) are not an error.
    pub fn remove(&self) -> Result<(), InterceptError> {
        self.remove_family(&self.iptables)?;
        let v6 = self.ip6tables();
        if self
            .run(&v6, &["-t", "nat", "-L", "PREROUTING", "-n"])
            .is_ok()
        {
            self.remove_family(&v6)?;
        }
        Ok(())
    }

    fn remove_family(&self, binary: &str) -> Result<(), InterceptError> {
        for (hook, chain) in hooks() {
            while self
                .run(binary, &["-t", "nat", "-D", hook, "-p", "tcp", "-j", chain])
                .is_ok()
            {}
        }
        for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
            if self.run(binary, &["-t", "nat", "-L", chain, "-n"]).is_ok() {
                self.run(binary, &["-t", "nat", "-F", chain])?;
                self.run(binary, &["-t", "nat", "-X", chain])?;
            }
        }
        Ok(())
    }

    fn run(&self, binary: &str, args: &[&str]) -> Result<(), InterceptError> {
        let command = format!("{binary} {}", args.join(" "));
        let mut tries = 0;
        let out = loop {
            // -w: wait for the xtables lock instead of failing when another writer holds it.
            let out = Command::new(binary)
                .arg("-w")
                .args(args)
                .output()
                .map_err(|source| InterceptError::Spawn {
                    command: command.clone(),
                    source,
                })?;
            // Exit status 4 is a resource problem (a table changed under us), not an answer:
            // a check (-C) that failed this way says nothing about whether the rule exists.
            tries += 1;
            if out.status.code() != Some(4) || tries == 5 {
                break out;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        if out.status.success() {
            Ok(())
        } else {
            Err(InterceptError::Failed {
                command,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

fn hooks() -> [(&'static str, &'static str); 2] {
    [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Interception {
        Interception {
            iptables: "iptables".into(),
            inbound_port: 15006,
            outbound_port: 15001,
            proxy_uid: 1337,
            include_inbound_ports: None,
            exclude_inbound_ports: vec![15020],
            exclude_outbound_ports: vec![15010],
            exclude_outbound_cidrs: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00:10:96::/112".parse().unwrap(),
            ],
            ipv6: true,
        }
    }

    #[test]
    fn the_proxy_uid_is_exempt_before_any_redirect() {
        let rules: Vec<String> = sample().rules().iter().map(|r| r.join(" ")).collect();
        let uid = rules
            .iter()
            .position(|r| r.contains("--uid-owner 1337 -j RETURN"))
            .unwrap();
        let redirect = rules
            .iter()
            .position(|r| r.contains("OUTRIGGER_OUTPUT -p tcp -j REDIRECT --to-ports 15001"))
            .unwrap();
        assert!(uid < redirect);
        assert!(
            rules.contains(&"-t nat -A OUTRIGGER_INBOUND -p tcp --dport 15020 -j RETURN".into())
        );
        assert!(rules.contains(&"-t nat -A OUTRIGGER_OUTPUT -d 10.96.0.0/12 -j RETURN".into()));
        assert!(rules.last().unwrap().ends_with("--to-ports 15001"));
    }

    #[test]
    fn each_family_gets_only_its_own_cidrs() {
        let i = sample();
        let v4: Vec<String> = i
            .rules_for(Family::V4)
            .iter()
            .map(|r| r.join(" "))
            .collect();
        let v6: Vec<String> = i
            .rules_for(Family::V6)
            .iter()
            .map(|r| r.join(" "))
            .collect();
        assert!(v4.iter().any(|r| r.contains("10.96.0.0/12")));
        assert!(!v4.iter().any(|r| r.contains("fd00:10:96::/112")));
        assert!(v6.iter().any(|r| r.contains("fd00:10:96::/112")));
        assert!(!v6.iter().any(|r| r.contains("10.96.0.0/12")));
        assert_eq!(
            Interception {
                iptables: "iptables-legacy".into(),
                ..i
            }
            .ip6tables(),
            "ip6tables-legacy"
        );
    }

    #[test]
    fn cidrs_parse_with_and_without_a_length() {
        assert_eq!(
            "10.0.0.1".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.1/32"
        );
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().len, 8);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }
}
