variable "aws_region" {
  description = "AWS region of the environment."
  type        = string
  default     = "eu-west-1"
}

variable "environment" {
  description = "Environment name; part of every resource name (cornjacket-<environment>)."
  type        = string
  default     = "dev"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.environment))
    error_message = "environment must be 2-21 lowercase letters, digits or '-', starting with a letter."
  }
}

variable "vpc_cidr" {
  description = "CIDR block of the environment's VPC (two public subnets are carved out of it)."
  type        = string
  default     = "10.42.0.0/16"
}

variable "public_cidr_blocks" {
  description = "Who may reach the public entry points, HTTP 80 (Traefik) and MQTT 1883 (EMQX) (ADR-0006)."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "admin_cidr_blocks" {
  description = "Who may reach the dashboards: Traefik 8180, EMQX 18083, Redpanda admin 9644 (ADR-0006). Never the whole internet."
  type        = list(string)

  validation {
    condition = length(var.admin_cidr_blocks) > 0 && alltrue([
      for c in var.admin_cidr_blocks : can(cidrhost(c, 0)) && c != "0.0.0.0/0"
    ])
    error_message = "admin_cidr_blocks must be one or more valid CIDR blocks, and not 0.0.0.0/0."
  }
}

variable "app_image_tag" {
  description = "Tag of the platform image in the app ECR repository (CI passes the commit SHA)."
  type        = string

  validation {
    condition     = length(var.app_image_tag) > 0
    error_message = "app_image_tag must not be empty."
  }
}

variable "ai_inference_image_tag" {
  description = "Tag of the ai-inference image in its ECR repository; empty means the same tag as the app."
  type        = string
  default     = ""
}

variable "desired_count" {
  description = "Running copies of the task. The stateful containers own EFS directories, so 0 or 1."
  type        = number
  default     = 1

  validation {
    condition     = contains([0, 1], var.desired_count)
    error_message = "desired_count must be 0 or 1: PostgreSQL, Redpanda and EMQX in the task are single-writer."
  }
}

variable "log_retention_days" {
  description = "CloudWatch Logs retention of every container's log group."
  type        = number
  default     = 14
}

variable "container_insights" {
  description = "Enable CloudWatch Container Insights on the cluster (extra cost)."
  type        = bool
  default     = false
}

variable "secret_recovery_window_days" {
  description = "Recovery window of the Secrets Manager secrets when destroyed (0 deletes at once)."
  type        = number
  default     = 7
}

variable "mqtt_username" {
  description = "MQTT user the platform connects with (EMQX built-in database); its password is generated."
  type        = string
  default     = "cornjacket"
}

variable "jwt_issuer" {
  description = "Required `iss` of API tokens (CJ_JWT_ISSUER); empty accepts any issuer."
  type        = string
  default     = ""
}

variable "jwt_audience" {
  description = "Required `aud` of API tokens (CJ_JWT_AUDIENCE); empty accepts any audience."
  type        = string
  default     = ""
}

variable "cpu_architecture" {
  description = "CPU architecture of the task; must match the images CI builds."
  type        = string
  default     = "X86_64"
}

variable "traefik_image" {
  description = "Traefik image (API gateway)."
  type        = string
  default     = "traefik:v3.3"
}

variable "emqx_image" {
  description = "EMQX image (MQTT broker)."
  type        = string
  default     = "emqx/emqx:5.8.5"
}

variable "redpanda_image" {
  description = "Redpanda image (Kafka API)."
  type        = string
  default     = "docker.redpanda.com/redpandadata/redpanda:v24.3.5"
}

variable "postgres_image" {
  description = "PostgreSQL image with TimescaleDB (Alpine based: the postgres user is uid 70)."
  type        = string
  default     = "timescale/timescaledb:latest-pg16"
}
