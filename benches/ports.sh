# free_port for the benchmarks and the end-to-end suite. Source it.
# shellcheck shell=bash

# free_port: a loopback TCP port nobody listens on, below the kernel's ephemeral range
# so that no client socket of another run can hold it (bind would fail with
# EADDRINUSE). Returns 1 when none of 200 tries is free.
free_port() {
    local low p
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range
    for p in $(shuf -i $((low / 2))-$((low - 1)) -n 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
    echo "no free port below $low" >&2
    return 1
}
