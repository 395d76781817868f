# Sourced by scripts/link-order and scripts/pgo, which both run the proxy under a load to learn
# which of its code requests use: free loopback ports, and the one-route config they run it on.

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
