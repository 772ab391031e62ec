# capstan-agent: acts with its own node key (a file), so it reads no
# platform secret. Vault's default policy lets it renew its own token.
path "secret/data/capstan/agents/*" {
  capabilities = ["deny"]
}
# Its own TLS certificate (--tls-vault-pki capstan-agent), for the name
# `agent` only: the role allows nothing else.
path "pki/issue/capstan-agent" {
  capabilities = ["update"]
}
