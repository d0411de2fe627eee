# Security groups per ADR-0006 (seed 000 §6.3), dev posture:
#   public (var.public_cidr_blocks):   80 (Traefik HTTP), 1883 (MQTT)
#   admins only (var.admin_cidr_blocks): 8180 (Traefik dashboard), 18083 (EMQX dashboard), 9644 (Redpanda admin)
#   internal only: everything else — PostgreSQL 5432, Kafka 9092, the platform's 8080-8085 and the
#   sidecar's 8090 are reached over the task's localhost and have no ingress rule at all (the
#   console on 8085 is public only through Traefik on 80, under /console/).

locals {
  public_ports = {
    http = 80
    mqtt = 1883
  }

  dashboard_ports = {
    traefik-dashboard = 8180
    emqx-dashboard    = 18083
    redpanda-admin    = 9644
  }

  public_rules = {
    for pair in setproduct(keys(local.public_ports), var.public_cidr_blocks) :
    "${pair[0]}-${pair[1]}" => { port = local.public_ports[pair[0]], cidr = pair[1] }
  }

  dashboard_rules = {
    for pair in setproduct(keys(local.dashboard_ports), var.admin_cidr_blocks) :
    "${pair[0]}-${pair[1]}" => { port = local.dashboard_ports[pair[0]], cidr = pair[1] }
  }
}

resource "aws_security_group" "task" {
  name        = "${local.name}-task"
  description = "cornjacket task: public HTTP/MQTT, dashboards for admins only"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${local.name}-task" }
}

resource "aws_vpc_security_group_ingress_rule" "public" {
  for_each = local.public_rules

  security_group_id = aws_security_group.task.id
  description       = "public ${each.key}"
  cidr_ipv4         = each.value.cidr
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
}

resource "aws_vpc_security_group_ingress_rule" "dashboards" {
  for_each = local.dashboard_rules

  security_group_id = aws_security_group.task.id
  description       = "admin ${each.key}"
  cidr_ipv4         = each.value.cidr
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
}

# Image pulls, Secrets Manager, CloudWatch Logs, webhooks: outbound is open.
resource "aws_vpc_security_group_egress_rule" "task_all" {
  security_group_id = aws_security_group.task.id
  description       = "all outbound"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
}

resource "aws_security_group" "efs" {
  name        = "${local.name}-efs"
  description = "cornjacket EFS: NFS from the task only"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${local.name}-efs" }
}

resource "aws_vpc_security_group_ingress_rule" "efs_from_task" {
  security_group_id            = aws_security_group.efs.id
  description                  = "NFS from the task"
  referenced_security_group_id = aws_security_group.task.id
  ip_protocol                  = "tcp"
  from_port                    = 2049
  to_port                      = 2049
}
