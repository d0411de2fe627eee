# One CloudWatch log group per container (awslogs driver in the task definition).

locals {
  container_names = ["traefik", "app", "mqtt-broker", "redpanda", "postgres", "ai-inference"]
}

resource "aws_cloudwatch_log_group" "container" {
  for_each = toset(local.container_names)

  name              = "/ecs/${local.name}/${each.key}"
  retention_in_days = var.log_retention_days
}
