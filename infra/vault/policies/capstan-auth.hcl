# capstan-auth: holds the signing key, creates the services' key and the
# node keys of a single-host install, signs tokens with transit.
path "secret/data/capstan/auth/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/data/capstan/capstan/service-key" {
  capabilities = ["create", "read", "update"]
}
path "secret/data/capstan/nodes/*" {
  capabilities = ["create", "read", "update"]
}
path "transit/sign/capstan-jwt" {
  capabilities = ["update"]
}
path "transit/keys/capstan-jwt" {
  capabilities = ["read"]
}
# Its own TLS certificate (--tls-vault-pki capstan-auth), for the name
# `auth` only: the role allows nothing else.
path "pki/issue/capstan-auth" {
  capabilities = ["update"]
}
