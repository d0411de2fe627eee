# The ECS task of seed 004 §2.1 (SPEC §14): six containers in one Fargate task, 1 vCPU / 2 GB in
# total, sharing the task's network namespace — they reach each other on localhost, which is why
# Redpanda's pandaproxy/schema registry and EMQX's WebSocket listeners are moved off the platform's
# ports 8081-8084. Ports (SPEC §2): traefik 80 + 8180, app 8080-8085 (8085: the operator console,
# reached through Traefik's /console/), mqtt-broker 1883 + 18083, redpanda 9092 + 9644, postgres
# 5432, ai-inference 8090. Checked by tests/deploy/check_terraform.py.

locals {
  app_image          = "${aws_ecr_repository.app.repository_url}:${var.app_image_tag}"
  ai_inference_image = "${aws_ecr_repository.ai_inference.repository_url}:${var.ai_inference_image_tag != "" ? var.ai_inference_image_tag : var.app_image_tag}"

  # Traefik's configuration is the repository's traefik/ directory. Fargate has no bind mounts, so
  # the files travel base64-encoded in the environment and the container writes them at start. The
  # dynamic files are merged (each file owns different sections under `http`), and the compose host
  # name `app` becomes localhost.
  traefik_dir = "${path.module}/../traefik"
  traefik_dynamic = {
    http = merge([
      for f in sort(fileset("${local.traefik_dir}/dynamic", "*.yaml")) :
      yamldecode(replace(file("${local.traefik_dir}/dynamic/${f}"), "http://app:", "http://localhost:")).http
    ]...)
  }
  traefik_static_b64  = base64encode(file("${local.traefik_dir}/traefik.yaml"))
  traefik_dynamic_b64 = base64encode(yamlencode(local.traefik_dynamic))

  container_definitions = [
    {
      name       = "traefik"
      image      = var.traefik_image
      essential  = true
      entryPoint = ["/bin/sh", "-ec"]
      command = [join("\n", [
        "mkdir -p /etc/traefik/dynamic",
        "printf '%s' \"$TRAEFIK_STATIC_CONFIG_B64\" | base64 -d > /etc/traefik/traefik.yaml",
        "printf '%s' \"$TRAEFIK_DYNAMIC_CONFIG_B64\" | base64 -d > /etc/traefik/dynamic/platform.yaml",
        "exec traefik --configFile=/etc/traefik/traefik.yaml",
      ])]
      portMappings = [
        { name = "http", containerPort = 80, protocol = "tcp" },
        { name = "traefik-dashboard", containerPort = 8180, protocol = "tcp" },
      ]
      environment = [
        { name = "TRAEFIK_STATIC_CONFIG_B64", value = local.traefik_static_b64 },
        { name = "TRAEFIK_DYNAMIC_CONFIG_B64", value = local.traefik_dynamic_b64 },
      ]
      dependsOn = [
        { containerName = "app", condition = "START" },
      ]
      healthCheck = {
        command     = ["CMD", "traefik", "healthcheck", "--ping"]
        interval    = 15
        timeout     = 5
        retries     = 3
        startPeriod = 30
      }
      memoryReservation = 96
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          "awslogs-group"         = aws_cloudwatch_log_group.container["traefik"].name
          "awslogs-region"        = var.aws_region
          "awslogs-stream-prefix" = "traefik"
        }
      }
    },
    {
      name      = "app"
      image     = local.app_image
      essential = true
      command   = ["serve"]
      portMappings = [
        { name = "ingestion", containerPort = 8080, protocol = "tcp" },
        { name = "query", containerPort = 8081, protocol = "tcp" },
        { name = "actions", containerPort = 8082, protocol = "tcp" },
        { name = "actions-health", containerPort = 8083, protocol = "tcp" },
        { name = "eventhandler-health", containerPort = 8084, protocol = "tcp" },
        { name = "console", containerPort = 8085, protocol = "tcp" },
      ]
      # SPEC §3 / §11: behind Traefik, everything else on the task's localhost.
      environment = [
        { name = "CJ_AUTH_MODE", value = "gateway" },
        { name = "CJ_BIND_ADDR", value = "0.0.0.0" },
        # Traefik runs in this task and reaches the app on localhost: the app limits by the
        # client Traefik names in X-Forwarded-For, at Traefik's own rate.
        { name = "CJ_TRUSTED_PROXIES", value = "127.0.0.1,::1" },
        { name = "CJ_INGESTION_RATE_LIMIT", value = "100" },
        { name = "CJ_INGESTION_RATE_BURST", value = "200" },
        { name = "CJ_API_RATE_LIMIT", value = "100" },
        { name = "CJ_API_RATE_BURST", value = "200" },
        { name = "CJ_LOG_FORMAT", value = "json" },
        { name = "CJ_LOG_LEVEL", value = "info" },
        { name = "CJ_KAFKA_BROKERS", value = "localhost:9092" },
        { name = "CJ_MQTT_URL", value = "mqtt://localhost:1883" },
        { name = "CJ_MQTT_USERNAME", value = var.mqtt_username },
        { name = "CJ_JWT_ISSUER", value = var.jwt_issuer },
        { name = "CJ_JWT_AUDIENCE", value = var.jwt_audience },
      ]
      secrets = [
        { name = "CJ_DATABASE_URL", valueFrom = "${aws_secretsmanager_secret.database.arn}:url::" },
        { name = "CJ_JWT_SECRET", valueFrom = aws_secretsmanager_secret.jwt.arn },
        { name = "CJ_MQTT_PASSWORD", valueFrom = "${aws_secretsmanager_secret.mqtt.arn}:password::" },
      ]
      dependsOn = [
        { containerName = "postgres", condition = "HEALTHY" },
        { containerName = "redpanda", condition = "HEALTHY" },
        { containerName = "mqtt-broker", condition = "HEALTHY" },
      ]
      # Liveness (ECS replaces the task when an essential container stays unhealthy): `serve` runs
      # all six services, each with its own HTTP server, so the app is alive when every probe port
      # answers /livez (ingestion 8080, query 8081, actions 8083, event handler + tsdb-writer 8084,
      # console 8085; the actions API 8082 has none; five 2s probes in turn, hence the 12s
      # timeout). /livez asks no dependency, so a database or broker blip never gets the task
      # replaced; readiness (/readyz, 503 while unhealthy) is Traefik's check for traffic
      # (traefik/dynamic/routers.yaml, shipped above). There is no load balancer or target group
      # in front of the task: Traefik is its gateway.
      healthCheck = {
        command     = ["CMD-SHELL", "curl -fsS -o /dev/null --max-time 2 http://localhost:8080/livez && curl -fsS -o /dev/null --max-time 2 http://localhost:8081/livez && curl -fsS -o /dev/null --max-time 2 http://localhost:8083/livez && curl -fsS -o /dev/null --max-time 2 http://localhost:8084/livez && curl -fsS -o /dev/null --max-time 2 http://localhost:8085/livez"]
        interval    = 15
        timeout     = 12
        retries     = 3
        startPeriod = 60
      }
      memoryReservation = 256
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          "awslogs-group"         = aws_cloudwatch_log_group.container["app"].name
          "awslogs-region"        = var.aws_region
          "awslogs-stream-prefix" = "app"
        }
      }
    },
    {
      name       = "mqtt-broker"
      image      = var.emqx_image
      essential  = true
      entryPoint = ["/bin/sh", "-ec"]
      # Writes the platform's MQTT user for EMQX's bootstrap import and the ACL (container-local
      # /tmp, not EFS).
      command = [join("\n", [
        "umask 077",
        "printf 'user_id,password,is_superuser\\n%s,%s,false\\n' \"$MQTT_USERNAME\" \"$MQTT_PASSWORD\" > \"$EMQX_AUTHENTICATION__1__BOOTSTRAP_FILE\"",
        # The ACL, the same rules as docker-compose.fullstack.yaml (`$${` is HCL for a literal `${`).
        "printf '{deny, {username, {re, \"[/+#]\"}}, all, [\"#\"]}.\\n{allow, {username, \"%s\"}, subscribe, [\"devices/+/events\"]}.\\n{allow, {username, \"%s\"}, publish, [\"devices/+/errors\"]}.\\n{allow, all, publish, [\"devices/$${username}/events\"]}.\\n{allow, all, subscribe, [\"devices/$${username}/errors\"]}.\\n{deny, all}.\\n' \"$MQTT_USERNAME\" \"$MQTT_USERNAME\" > \"$EMQX_AUTHORIZATION__SOURCES__1__PATH\"",
        "exec /usr/bin/docker-entrypoint.sh /opt/emqx/bin/emqx foreground",
      ])]
      portMappings = [
        { name = "mqtt", containerPort = 1883, protocol = "tcp" },
        { name = "emqx-dashboard", containerPort = 18083, protocol = "tcp" },
      ]
      environment = [
        { name = "MQTT_USERNAME", value = var.mqtt_username },
        { name = "EMQX_AUTHENTICATION__1__MECHANISM", value = "password_based" },
        { name = "EMQX_AUTHENTICATION__1__BACKEND", value = "built_in_database" },
        { name = "EMQX_AUTHENTICATION__1__USER_ID_TYPE", value = "username" },
        { name = "EMQX_AUTHENTICATION__1__PASSWORD_HASH_ALGORITHM__NAME", value = "sha256" },
        { name = "EMQX_AUTHENTICATION__1__PASSWORD_HASH_ALGORITHM__SALT_POSITION", value = "suffix" },
        { name = "EMQX_AUTHENTICATION__1__BOOTSTRAP_FILE", value = "/tmp/emqx-auth-bootstrap.csv" },
        { name = "EMQX_AUTHENTICATION__1__BOOTSTRAP_TYPE", value = "plain" },
        # Authorization and queues: as in docker-compose.fullstack.yaml (see the comments there).
        { name = "EMQX_AUTHORIZATION__NO_MATCH", value = "deny" },
        { name = "EMQX_AUTHORIZATION__SOURCES__1__TYPE", value = "file" },
        { name = "EMQX_AUTHORIZATION__SOURCES__1__ENABLE", value = "true" },
        { name = "EMQX_AUTHORIZATION__SOURCES__1__PATH", value = "/tmp/emqx-acl.conf" },
        { name = "EMQX_MQTT__MAX_MQUEUE_LEN", value = "1000000" },
        { name = "EMQX_MQTT__MQUEUE_STORE_QOS0", value = "false" },
        { name = "EMQX_MQTT__MAX_INFLIGHT", value = "1000" },
        { name = "EMQX_MQTT__MAX_PACKET_SIZE", value = "256KB" },
        { name = "EMQX_FORCE_SHUTDOWN__MAX_HEAP_SIZE", value = "1GB" },
        { name = "EMQX_FORCE_SHUTDOWN__MAX_MAILBOX_SIZE", value = "1000000" },
        { name = "EMQX_OVERLOAD_PROTECTION__ENABLE", value = "true" },
        # 8083/8084 are the platform's health ports on the shared localhost.
        { name = "EMQX_LISTENERS__WS__DEFAULT__ENABLE", value = "false" },
        { name = "EMQX_LISTENERS__WSS__DEFAULT__ENABLE", value = "false" },
      ]
      secrets = [
        { name = "MQTT_PASSWORD", valueFrom = "${aws_secretsmanager_secret.mqtt.arn}:password::" },
        { name = "EMQX_DASHBOARD__DEFAULT_PASSWORD", valueFrom = "${aws_secretsmanager_secret.mqtt.arn}:dashboard_password::" },
      ]
      mountPoints = [
        { sourceVolume = "mqtt-broker-data", containerPath = "/opt/emqx/data", readOnly = false },
      ]
      healthCheck = {
        command     = ["CMD", "/opt/emqx/bin/emqx", "ctl", "status"]
        interval    = 15
        timeout     = 5
        retries     = 5
        startPeriod = 60
      }
      memoryReservation = 384
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          "awslogs-group"         = aws_cloudwatch_log_group.container["mqtt-broker"].name
          "awslogs-region"        = var.aws_region
          "awslogs-stream-prefix" = "mqtt-broker"
        }
      }
    },
    {
      name      = "redpanda"
      image     = var.redpanda_image
      essential = true
      command = [
        "redpanda",
        "start",
        "--mode=dev-container",
        "--smp=1",
        "--memory=512M",
        "--reserve-memory=0M",
        "--overprovisioned",
        "--default-log-level=info",
        "--kafka-addr=internal://0.0.0.0:9092",
        "--advertise-kafka-addr=internal://localhost:9092",
        "--pandaproxy-addr=internal://0.0.0.0:18082",
        "--advertise-pandaproxy-addr=internal://localhost:18082",
        "--schema-registry-addr=internal://0.0.0.0:18081",
        "--rpc-addr=0.0.0.0:33145",
        "--advertise-rpc-addr=localhost:33145",
        # Bus retention 24 h (SPEC §13), applied when the data directory is first created; keep
        # acknowledged writes on disk (dev-container mode would cache them).
        "--set=redpanda.log_retention_ms=86400000",
        "--set=redpanda.write_caching_default=false",
      ]
      portMappings = [
        { name = "kafka", containerPort = 9092, protocol = "tcp" },
        { name = "redpanda-admin", containerPort = 9644, protocol = "tcp" },
      ]
      mountPoints = [
        { sourceVolume = "redpanda-data", containerPath = "/var/lib/redpanda/data", readOnly = false },
      ]
      healthCheck = {
        command     = ["CMD-SHELL", "rpk cluster health | grep -E 'Healthy:.+true' || exit 1"]
        interval    = 15
        timeout     = 5
        retries     = 5
        startPeriod = 60
      }
      memoryReservation = 640
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          "awslogs-group"         = aws_cloudwatch_log_group.container["redpanda"].name
          "awslogs-region"        = var.aws_region
          "awslogs-stream-prefix" = "redpanda"
        }
      }
    },
    {
      name      = "postgres"
      image     = var.postgres_image
      essential = true
      portMappings = [
        { name = "postgres", containerPort = 5432, protocol = "tcp" },
      ]
      environment = [
        { name = "POSTGRES_USER", value = local.db_user },
        { name = "POSTGRES_DB", value = local.db_name },
        # A subdirectory of the EFS mount, so initdb finds an empty directory it owns.
        { name = "PGDATA", value = "/var/lib/postgresql/data/pgdata" },
        # timescaledb-tune sizes for the container, not for the Fargate host.
        { name = "TS_TUNE_MEMORY", value = "384MB" },
        { name = "TS_TUNE_NUM_CPUS", value = "1" },
      ]
      secrets = [
        { name = "POSTGRES_PASSWORD", valueFrom = "${aws_secretsmanager_secret.database.arn}:password::" },
      ]
      mountPoints = [
        { sourceVolume = "postgres-data", containerPath = "/var/lib/postgresql/data", readOnly = false },
      ]
      healthCheck = {
        command     = ["CMD-SHELL", "pg_isready -h 127.0.0.1 -U ${local.db_user} -d ${local.db_name}"]
        interval    = 10
        timeout     = 5
        retries     = 5
        startPeriod = 60
      }
      memoryReservation = 384
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          "awslogs-group"         = aws_cloudwatch_log_group.container["postgres"].name
          "awslogs-region"        = var.aws_region
          "awslogs-stream-prefix" = "postgres"
        }
      }
    },
    {
      # The Python anomaly sidecar (SPEC §9, ai-inference/README.md), image from ai-inference/.
      # It posts ai.anomaly events to the app's ingestion port on the task's localhost (not through
      # Traefik), with a token it mints from the JWT secret (scope ingest:write).
      name      = "ai-inference"
      image     = local.ai_inference_image
      essential = true
      portMappings = [
        { name = "ai-inference", containerPort = 8090, protocol = "tcp" },
      ]
      environment = [
        { name = "CJ_BIND_ADDR", value = "0.0.0.0" },
        { name = "CJ_LOG_FORMAT", value = "json" },
        { name = "CJ_LOG_LEVEL", value = "info" },
        { name = "CJ_KAFKA_BROKERS", value = "localhost:9092" },
        { name = "CJ_AI_INGEST_URL", value = "http://localhost:8080" },
        { name = "CJ_JWT_ISSUER", value = var.jwt_issuer },
        { name = "CJ_JWT_AUDIENCE", value = var.jwt_audience },
      ]
      secrets = [
        { name = "CJ_AI_DATABASE_URL", valueFrom = "${aws_secretsmanager_secret.database.arn}:url::" },
        { name = "CJ_JWT_SECRET", valueFrom = aws_secretsmanager_secret.jwt.arn },
      ]
      # The app's HEALTHY is its liveness (its process serves): enough, since an ai.anomaly the
      # ingestion API cannot take yet blocks the sidecar's partition and is retried, never lost.
      dependsOn = [
        { containerName = "postgres", condition = "HEALTHY" },
        { containerName = "redpanda", condition = "HEALTHY" },
        { containerName = "app", condition = "HEALTHY" },
      ]
      # Liveness, as for the app: /livez answers while the process serves, whatever the database
      # does. /readyz (= /health) answers 503 until the consumer has joined its group and while the
      # database is away; nothing routes traffic to the sidecar.
      healthCheck = {
        command     = ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8090/livez', timeout=3)"]
        interval    = 15
        timeout     = 5
        retries     = 3
        startPeriod = 60
      }
      memoryReservation = 256
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          "awslogs-group"         = aws_cloudwatch_log_group.container["ai-inference"].name
          "awslogs-region"        = var.aws_region
          "awslogs-stream-prefix" = "ai-inference"
        }
      }
    },
  ]
}

resource "aws_ecs_cluster" "main" {
  name = local.name

  setting {
    name  = "containerInsights"
    value = var.container_insights ? "enabled" : "disabled"
  }
}

resource "aws_ecs_task_definition" "platform" {
  family                   = local.name
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 1024
  memory                   = 2048
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn
  container_definitions    = jsonencode(local.container_definitions)

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.cpu_architecture
  }

  volume {
    name = "postgres-data"
    efs_volume_configuration {
      file_system_id     = aws_efs_file_system.data.id
      transit_encryption = "ENABLED"
      authorization_config {
        access_point_id = aws_efs_access_point.postgres.id
        iam             = "ENABLED"
      }
    }
  }

  volume {
    name = "redpanda-data"
    efs_volume_configuration {
      file_system_id     = aws_efs_file_system.data.id
      transit_encryption = "ENABLED"
      authorization_config {
        access_point_id = aws_efs_access_point.redpanda.id
        iam             = "ENABLED"
      }
    }
  }

  volume {
    name = "mqtt-broker-data"
    efs_volume_configuration {
      file_system_id     = aws_efs_file_system.data.id
      transit_encryption = "ENABLED"
      authorization_config {
        access_point_id = aws_efs_access_point.mqtt_broker.id
        iam             = "ENABLED"
      }
    }
  }
}

resource "aws_ecs_service" "platform" {
  name                   = local.name
  cluster                = aws_ecs_cluster.main.id
  task_definition        = aws_ecs_task_definition.platform.arn
  desired_count          = var.desired_count
  launch_type            = "FARGATE"
  platform_version       = "1.4.0"
  enable_execute_command = true
  propagate_tags         = "SERVICE"

  # Never two copies of the stateful containers on the same EFS directories: stop, then start.
  deployment_minimum_healthy_percent = 0
  deployment_maximum_percent         = 100

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  network_configuration {
    subnets          = aws_subnet.public[*].id
    security_groups  = [aws_security_group.task.id]
    assign_public_ip = true
  }

  depends_on = [
    aws_efs_mount_target.data,
    aws_iam_role_policy.execution_secrets,
    aws_secretsmanager_secret_version.jwt,
    aws_secretsmanager_secret_version.database,
    aws_secretsmanager_secret_version.mqtt,
  ]
}
