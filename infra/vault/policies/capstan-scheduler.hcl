# capstan-scheduler: reads the services' key, nothing else.
path "secret/data/capstan/capstan/service-key" {
  capabilities = ["read"]
}
# Its own TLS certificate (--tls-vault-pki capstan-scheduler), for the name
# `scheduler` only: the role allows nothing else.
path "pki/issue/capstan-scheduler" {
  capabilities = ["update"]
}
