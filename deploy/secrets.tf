# Secrets Manager (ADR-0006 / seed 000 §6.2): the JWT key, the database password and the MQTT
# password. Values are generated here and read by ECS at task start (container `secrets`), never
# placed in plain environment variables. They are in the Terraform state too: keep the state bucket
# encrypted and private. Alphanumeric only, so they embed in URLs and EMQX's bootstrap CSV as is.

resource "random_password" "jwt" {
  length  = 64
  special = false
}

resource "random_password" "database" {
  length  = 32
  special = false
}

resource "random_password" "mqtt" {
  length  = 32
  special = false
}

resource "random_password" "emqx_dashboard" {
  length  = 24
  special = false
}

# HS256 key of the API tokens (CJ_JWT_SECRET), a plain string.
resource "aws_secretsmanager_secret" "jwt" {
  name                    = "${local.name}/jwt-secret"
  description             = "HS256 key the platform verifies API tokens with (CJ_JWT_SECRET)."
  recovery_window_in_days = var.secret_recovery_window_days
}

resource "aws_secretsmanager_secret_version" "jwt" {
  secret_id     = aws_secretsmanager_secret.jwt.id
  secret_string = random_password.jwt.result
}

# JSON: password (POSTGRES_PASSWORD) and url (CJ_DATABASE_URL, PostgreSQL on the task's localhost).
resource "aws_secretsmanager_secret" "database" {
  name                    = "${local.name}/database"
  description             = "PostgreSQL password and the platform's database URL."
  recovery_window_in_days = var.secret_recovery_window_days
}

resource "aws_secretsmanager_secret_version" "database" {
  secret_id = aws_secretsmanager_secret.database.id
  secret_string = jsonencode({
    username = local.db_user
    password = random_password.database.result
    url      = "postgres://${local.db_user}:${random_password.database.result}@localhost:5432/${local.db_name}?sslmode=disable"
  })
}

# JSON: the platform's MQTT user and password (EMQX built-in database) and the EMQX dashboard password.
resource "aws_secretsmanager_secret" "mqtt" {
  name                    = "${local.name}/mqtt"
  description             = "EMQX: the platform's MQTT password and the dashboard admin password."
  recovery_window_in_days = var.secret_recovery_window_days
}

resource "aws_secretsmanager_secret_version" "mqtt" {
  secret_id = aws_secretsmanager_secret.mqtt.id
  secret_string = jsonencode({
    username           = var.mqtt_username
    password           = random_password.mqtt.result
    dashboard_password = random_password.emqx_dashboard.result
  })
}
