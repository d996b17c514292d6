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

# haproxy_checked_conf FILE PORT UPSTREAM_PORT...: like haproxy_conf, in front of
# several upstreams, round-robin, each with a send/expect health check ("PING\n"
# echoed) every 500 ms, down after 2 failures, up after 2 passes, 500 ms to answer.
haproxy_checked_conf() {
    local up servers="" i=0
    for up in "${@:3}"; do
        servers+="    server up$i 127.0.0.1:$up check inter 500 fall 2 rise 2"$'\n'
        i=$((i + 1))
    done
    cat >"$1" <<CFG
global
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m
    timeout check 500ms
frontend fe
    bind 127.0.0.1:$2
    default_backend be
backend be
    balance roundrobin
    option tcp-check
    tcp-check send PING\\n
    tcp-check expect string PING
${servers}
CFG
}

# haproxy_tcplog_conf FILE PORT UPSTREAM_PORT: haproxy_conf's relay with HAProxy's
# connection log on: `option tcplog` (one line per connection, at its end) written to
# HAProxy's own stdout, without a syslog header (`format raw`). HAProxy has no file
# target of its own: a log goes to a syslog server, a `ring`, or a file descriptor,
# and fd 1 redirected to a file is the nearest to writing a file itself (one writev(2)
# per record, in the thread that closed the connection).
haproxy_tcplog_conf() {
    haproxy_conf "$@" "log stdout format raw local0"
    sed -i 's/^frontend fe$/&\n    log global\n    option tcplog/' "$1"
}
