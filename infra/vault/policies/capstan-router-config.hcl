# capstan-router-config: reads the services' key; keeps the Traefik
# provider's bearer token.
path "secret/data/capstan/capstan/service-key" {
  capabilities = ["read"]
}
path "secret/data/capstan/router-config/*" {
  capabilities = ["create", "read", "update"]
}
