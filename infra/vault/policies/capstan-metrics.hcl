# capstan-metrics: reads the services' key.
path "secret/data/capstan/capstan/service-key" {
  capabilities = ["read"]
}
# Its own TLS certificate (--tls-vault-pki capstan-metrics), for the name
# `metrics` only: the role allows nothing else.
path "pki/issue/capstan-metrics" {
  capabilities = ["update"]
}
