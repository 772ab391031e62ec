# capstan-scheduler: reads the services' key, nothing else.
path "secret/data/capstan/capstan/service-key" {
  capabilities = ["read"]
}
