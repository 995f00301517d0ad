# OpenBao config for the compose stack: the file audit device of the embedded stack
# (airflow_finetune_gov.stack.openbao.write_config), declared in config so the API never has to
# enable audit devices. tests/test_docker_compose.py keeps the two identical.
ui = false
audit "file" "fgov" {
  options {
    file_path = "/openbao/logs/audit.log"
    mode = "0600"
  }
}
