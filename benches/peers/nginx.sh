# nginx as a peer: Debian's nginx-light, one worker, `return 200`, access log off.
# Source it; it only defines functions. Used by the benchmarks and the e2e suite.
# shellcheck shell=bash

# nginx_conf DIR PORT: writes DIR/nginx.conf for a one-worker nginx on 127.0.0.1:PORT
# that answers "/" with 200 "Hello, World!" and "/missing" with 404.
nginx_conf() {
    local dir=$1 port=$2
    cat >"$dir/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
error_log $dir/nginx-error.log warn;
pid $dir/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$port;
        location / { return 200 "Hello, World!"; }
        location /missing { return 404; }
    }
}
NGINX
}
