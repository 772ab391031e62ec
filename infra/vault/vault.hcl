# Vault for docker-compose.yml: a real server (not dev mode) with its data
# in the `vault-data` volume. The listener is plain HTTP on the compose
# network only; put TLS in front (or tls_cert_file/tls_key_file here)
# before Vault leaves one host.
storage "file" {
  path = "/vault/file"
}
listener "tcp" {
  address     = "0.0.0.0:8200"
  tls_disable = 1
}
api_addr      = "http://vault:8200"
disable_mlock = true
ui            = true
