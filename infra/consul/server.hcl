# One Consul server for docker-compose.yml (a single-host install; run three
# or five servers across hosts in production). The services register with
# TTL checks and find each other with blocking health queries.
server           = true
bootstrap_expect = 1
data_dir         = "/consul/data"
client_addr      = "0.0.0.0"
ui_config {
  enabled = true
}
# Sessions back Capstan's leader locks; 10s is Consul's minimum TTL.
session_ttl_min = "10s"
