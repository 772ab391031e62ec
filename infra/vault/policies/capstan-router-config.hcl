# capstan-router-config: reads the services' key; keeps the Traefik
# provider's bearer token.
path "secret/data/capstan/capstan/service-key" {
  capabilities = ["read"]
}
path "secret/data/capstan/router-config/*" {
  capabilities = ["create", "read", "update"]
}
# Its own TLS certificate (--tls-vault-pki capstan-router-config), for the name
# `router-config` only: the role allows nothing else.
path "pki/issue/capstan-router-config" {
  capabilities = ["update"]
}
