#!/usr/bin/env bash
# Prepares Vault for Capstan, idempotently, through Vault's HTTP API:
#   - AppRole auth at approle/, KV v2 at secret/, transit at transit/ with
#     an ed25519 key `capstan-jwt`, PKI at pki/ with an internal root CA:
#     each enabled only when missing;
#   - one PKI role per service, capstan-<service>, that issues only for the
#     bare name <service> (server and client use), for --tls-vault-pki;
#   - one least-privilege policy per service, from infra/vault/policies/;
#   - one AppRole per service, bound to its policy;
#   - for each service, OUT_DIR/<service>.role-id and a fresh
#     response-wrapped secret_id in OUT_DIR/<service>.secret-id (mode 0600),
#     for `--vault-role-id-file` and `--vault-secret-id-file`. The wrapping
#     token can be unwrapped once; a service that finds it used refuses to
#     start and reports possible tampering.
#
# Usage: VAULT_ADDR=http://127.0.0.1:8200 VAULT_TOKEN=... infra/vault/init.sh OUT_DIR
# Needs curl and python3. Running it again changes nothing but the
# secret_ids it delivers.
set -euo pipefail

: "${VAULT_ADDR:?set VAULT_ADDR, e.g. http://127.0.0.1:8200}"
: "${VAULT_TOKEN:?set VAULT_TOKEN to a token that may configure Vault}"
out_dir=${1:?usage: init.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
services=(auth scheduler orchestrator router-config metrics gateway agent)
# Token lifetimes of the services' AppRole logins; Capstan renews at 2/3.
token_ttl=${CAPSTAN_VAULT_TOKEN_TTL:-1h}
token_max_ttl=${CAPSTAN_VAULT_TOKEN_MAX_TTL:-24h}
wrap_ttl=${CAPSTAN_VAULT_WRAP_TTL:-15m}
# Lifetime of the services' certificates; Capstan renews at 2/3.
cert_ttl=${CAPSTAN_VAULT_CERT_TTL:-72h}

for tool in curl python3; do
  command -v "$tool" >/dev/null || { echo "init.sh: needs $tool" >&2; exit 1; }
done

# api METHOD PATH [JSON] [extra curl args...]: prints the body; fails on
# anything but 2xx, with Vault's errors.
api() {
  local method=$1 path=$2 body=${3:-} response status
  shift $(( $# < 3 ? $# : 3 ))
  response=$(curl -sS -X "$method" -H "X-Vault-Token: $VAULT_TOKEN" \
    ${body:+-H "Content-Type: application/json" --data "$body"} \
    -w '\n%{http_code}' "$@" "$VAULT_ADDR/v1/$path")
  status=${response##*$'\n'}
  response=${response%$'\n'*}
  if [ "${status:0:1}" != 2 ]; then
    echo "init.sh: $method /v1/$path answered $status: $response" >&2
    return 1
  fi
  printf '%s' "$response"
}

# exists PATH: whether a GET of PATH answers 2xx.
exists() {
  local status
  status=$(curl -sS -o /dev/null -w '%{http_code}' -H "X-Vault-Token: $VAULT_TOKEN" "$VAULT_ADDR/v1/$1")
  [ "${status:0:1}" = 2 ]
}

json() { python3 -c "import json,sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))" "$@"; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }

exists sys/auth/approle || api POST sys/auth/approle "$(json type approle)" >/dev/null
exists sys/mounts/secret || api POST sys/mounts/secret '{"type":"kv","options":{"version":"2"}}' >/dev/null
exists sys/mounts/transit || api POST sys/mounts/transit "$(json type transit)" >/dev/null
exists transit/keys/capstan-jwt || api POST transit/keys/capstan-jwt "$(json type ed25519)" >/dev/null
exists sys/mounts/pki || api POST sys/mounts/pki '{"type":"pki","config":{"max_lease_ttl":"87600h"}}' >/dev/null
# pki/ca/pem answers an empty body until a root exists.
if [ -z "$(curl -sS "$VAULT_ADDR/v1/pki/ca/pem")" ]; then
  api POST pki/root/generate/internal '{"common_name":"Capstan CA","ttl":"87600h","key_type":"ec"}' >/dev/null
fi

mkdir -p "$out_dir"
chmod 0700 "$out_dir"
for service in "${services[@]}"; do
  policy="capstan-$service"
  policy_text=$(cat "$here/policies/$policy.hcl")
  api POST "pki/roles/$policy" \
    "{\"allowed_domains\":[\"$service\"],\"allow_bare_domains\":true,\"allow_subdomains\":false,\"allow_localhost\":false,\"server_flag\":true,\"client_flag\":true,\"key_type\":\"ec\",\"ttl\":\"$cert_ttl\",\"max_ttl\":\"$cert_ttl\"}" >/dev/null
  api POST "sys/policies/acl/$policy" "$(json policy "$policy_text")" >/dev/null
  api POST "auth/approle/role/$policy" \
    "{\"token_policies\":[\"$policy\"],\"token_ttl\":\"$token_ttl\",\"token_max_ttl\":\"$token_max_ttl\",\"secret_id_num_uses\":0}" >/dev/null
  role_id=$(api GET "auth/approle/role/$policy/role-id" | field "['data']['role_id']")
  wrapped=$(api POST "auth/approle/role/$policy/secret-id" '{}' -H "X-Vault-Wrap-TTL: $wrap_ttl" \
    | field "['wrap_info']['token']")
  (umask 077 && printf '%s\n' "$role_id" >"$out_dir/$service.role-id" && printf '%s\n' "$wrapped" >"$out_dir/$service.secret-id")
  echo "init.sh: $service: role $policy; $out_dir/$service.role-id, $out_dir/$service.secret-id (wrapped, $wrap_ttl)"
done
