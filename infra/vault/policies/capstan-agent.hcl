# capstan-agent: acts with its own node key (a file), so it reads no
# platform secret. Vault's default policy lets it renew its own token.
path "secret/data/capstan/agents/*" {
  capabilities = ["deny"]
}
