# HAProxy as a peer: Debian's package, tcp mode, one thread. Source it; it only defines
# functions. Used by the relay benchmarks.
# shellcheck shell=bash

# haproxy_conf FILE PORT UPSTREAM_PORT [GLOBAL_LINE...]: writes a one-thread tcp-mode
# configuration that relays 127.0.0.1:PORT to 127.0.0.1:UPSTREAM_PORT, with any
# GLOBAL_LINEs added to its global section.
haproxy_conf() {
    local line global=""
    for line in "${@:4}"; do global+="    $line"$'\n'; done
    cat >"$1" <<CFG
global
    nbthread 1
${global}defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m
frontend fe
    bind 127.0.0.1:$2
    default_backend be
backend be
    server up 127.0.0.1:$3
CFG
}
