#!/usr/bin/env bash
# The one-shot `vault-init` of docker-compose.yml, for a single-host
# install: initialises Vault (one key share) when it is not, unseals it
# when it is sealed, then runs init.sh with the root token and hands each
# service its AppRole credentials in its own directory:
#   OUT_DIR/<service>/role-id, OUT_DIR/<service>/secret-id (wrapped)
# owned by uid:gid CAPSTAN_UID (default 10001, the image's `capstan`).
#
# The unseal key and root token stay in KEYS_DIR/init.json (mode 0600), a
# volume only this job mounts. A production install initialises with
# several key shares held by people, and unseals by hand or auto-unseal.
#
# Usage: VAULT_ADDR=http://vault:8200 bootstrap.sh KEYS_DIR OUT_DIR
set -euo pipefail

: "${VAULT_ADDR:?set VAULT_ADDR, e.g. http://vault:8200}"
keys_dir=${1:?usage: bootstrap.sh KEYS_DIR OUT_DIR}
out_dir=${2:?usage: bootstrap.sh KEYS_DIR OUT_DIR}
owner=${CAPSTAN_UID:-10001}
here=$(cd "$(dirname "$0")" && pwd)
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }

umask 077
mkdir -p "$keys_dir"
if [ "$(curl -fsS "$VAULT_ADDR/v1/sys/init" | field "['initialized']")" != True ]; then
  echo "bootstrap.sh: initialising Vault (1 key share)"
  curl -fsS -X POST --data '{"secret_shares":1,"secret_threshold":1}' \
    "$VAULT_ADDR/v1/sys/init" >"$keys_dir/init.json.partial"
  mv "$keys_dir/init.json.partial" "$keys_dir/init.json"
fi
[ -f "$keys_dir/init.json" ] || { echo "bootstrap.sh: Vault is initialised but $keys_dir/init.json is missing: unseal it and run init.sh by hand" >&2; exit 1; }
if [ "$(curl -fsS "$VAULT_ADDR/v1/sys/seal-status" | field "['sealed']")" = True ]; then
  echo "bootstrap.sh: unsealing Vault"
  key=$(field "['keys_base64'][0]" <"$keys_dir/init.json")
  curl -fsS -X POST --data "{\"key\":\"$key\"}" "$VAULT_ADDR/v1/sys/unseal" >/dev/null
fi
VAULT_TOKEN=$(field "['root_token']" <"$keys_dir/init.json")
export VAULT_TOKEN

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
bash "$here/init.sh" "$staging"
for role_id in "$staging"/*.role-id; do
  service=$(basename "$role_id" .role-id)
  mkdir -p "$out_dir/$service"
  cp "$role_id" "$out_dir/$service/role-id"
  cp "$staging/$service.secret-id" "$out_dir/$service/secret-id"
  chown -R "$owner:$owner" "$out_dir/$service"
  chmod 0700 "$out_dir/$service"
done
echo "bootstrap.sh: AppRole credentials in $out_dir/<service>/"
