# Persistent storage of the three stateful containers (seed 004 §2.3; the seed defers EFS vs EBS,
# EFS is chosen because it outlives the task without snapshots). One encrypted file system, one
# access point per container, each rooted in its own directory and owned by the image's user.

resource "aws_efs_file_system" "data" {
  creation_token   = "${local.name}-data"
  encrypted        = true
  performance_mode = "generalPurpose"
  throughput_mode  = "elastic"

  tags = { Name = "${local.name}-data" }
}

resource "aws_efs_mount_target" "data" {
  count = length(aws_subnet.public)

  file_system_id  = aws_efs_file_system.data.id
  subnet_id       = aws_subnet.public[count.index].id
  security_groups = [aws_security_group.efs.id]
}

# timescale/timescaledb (Alpine): postgres is uid/gid 70.
resource "aws_efs_access_point" "postgres" {
  file_system_id = aws_efs_file_system.data.id

  posix_user {
    uid = 70
    gid = 70
  }

  root_directory {
    path = "/postgres"
    creation_info {
      owner_uid   = 70
      owner_gid   = 70
      permissions = "0700"
    }
  }

  tags = { Name = "${local.name}-postgres" }
}

# redpandadata/redpanda: the redpanda user is uid/gid 101.
resource "aws_efs_access_point" "redpanda" {
  file_system_id = aws_efs_file_system.data.id

  posix_user {
    uid = 101
    gid = 101
  }

  root_directory {
    path = "/redpanda"
    creation_info {
      owner_uid   = 101
      owner_gid   = 101
      permissions = "0755"
    }
  }

  tags = { Name = "${local.name}-redpanda" }
}

# emqx/emqx: the emqx user is uid/gid 1000.
resource "aws_efs_access_point" "mqtt_broker" {
  file_system_id = aws_efs_file_system.data.id

  posix_user {
    uid = 1000
    gid = 1000
  }

  root_directory {
    path = "/emqx"
    creation_info {
      owner_uid   = 1000
      owner_gid   = 1000
      permissions = "0755"
    }
  }

  tags = { Name = "${local.name}-mqtt-broker" }
}
