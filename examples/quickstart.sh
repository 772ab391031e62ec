#!/usr/bin/env bash
# Builds Capstan, starts `capstan dev` in the background, deploys the example
# app and shows it answering through the edge proxy.
#   bash examples/quickstart.sh        (stop later with: kill $(cat .capstan/dev.pid))
set -euo pipefail
cd "$(dirname "$0")/.."

data_dir="${CAPSTAN_DATA_DIR:-$PWD/.capstan}"
http_addr="${CAPSTAN_HTTP_ADDR:-127.0.0.1:8080}"
mkdir -p "$data_dir"

cargo build --release --locked --bin capstan
capstan=target/release/capstan

if [ -f "$data_dir/dev.pid" ] && kill -0 "$(cat "$data_dir/dev.pid")" 2>/dev/null; then
  echo "capstan dev is already running (pid $(cat "$data_dir/dev.pid"))"
else
  "$capstan" dev --data-dir "$data_dir" --http-addr "$http_addr" >"$data_dir/dev.log" 2>&1 &
  echo $! >"$data_dir/dev.pid"
  for _ in $(seq 1 100); do [ -f "$data_dir/endpoints.json" ] && break; sleep 0.1; done
  [ -f "$data_dir/endpoints.json" ] || { echo "capstan dev did not start; see $data_dir/dev.log"; exit 1; }
fi

"$capstan" app deploy -f examples/hello.toml --data-dir "$data_dir"
"$capstan" app status hello --data-dir "$data_dir"
echo
echo "\$ curl -H 'Host: hello.localhost' http://$http_addr/"
body="$(curl -sS -H 'Host: hello.localhost' "http://$http_addr/")"
printf '%s\n' "$body" | sed -n 1,5p
echo
echo "Capstan keeps running in the background (log: $data_dir/dev.log)."
echo "Try:  $capstan app scale hello 5 --data-dir $data_dir"
echo "Stop: kill \$(cat $data_dir/dev.pid)"
