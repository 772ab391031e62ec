# capstan-orchestrator: reads the services' key, nothing else.
path "secret/data/capstan/capstan/service-key" {
  capabilities = ["read"]
}
# Its own TLS certificate (--tls-vault-pki capstan-orchestrator), for the name
# `orchestrator` only: the role allows nothing else.
path "pki/issue/capstan-orchestrator" {
  capabilities = ["update"]
}
