# capstan-gateway: nothing of the platform's. Every call it makes carries
# its caller's token (Credential::CallersOnly); it never reads the
# services' key. Only its own TLS certificate (--tls-vault-pki
# capstan-gateway), for the name `gateway`.
path "pki/issue/capstan-gateway" {
  capabilities = ["update"]
}
