# Sourced by scripts/link-order and scripts/pgo, which both run the proxy under a load to learn
# which of its code requests use: free loopback ports, the one-route config they run it on, and
# the build that uses what scripts/pgo learnt.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Writes to $1 a config that forwards everything arriving on 127.0.0.1:$2 to 127.0.0.1:$4, with
# the admin port on 127.0.0.1:$3.
profile_config() {
  cat > "$1" <<CONFIG
admin:
  address: 127.0.0.1:$3
workers: 1
listeners:
  - name: profile
    address: 127.0.0.1:$2
    direction: outbound
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - backends: [{cluster: upstream}]
clusters:
  - name: upstream
    endpoints: [{address: "127.0.0.1:$4"}]
CONFIG
}

# Builds target/pgo/release/outrigger-proxy with the profile at $1 (an absolute path). cargo
# does not look at a profile's contents, only at the flags, so the build reads it under a name
# taken from its contents: a new profile rebuilds the proxy, the same one does not.
build_with_profile() {
  local named
  named="${1%.profdata}-$(sha256sum "$1" | cut -c1-16).profdata"
  [ -f "$named" ] || { rm -f "${1%.profdata}"-*.profdata; cp "$1" "$named"; }
  CARGO_TARGET_DIR=target/pgo RUSTFLAGS="-Cprofile-use=$named" \
    cargo build --release --locked -p outrigger-proxy
}
