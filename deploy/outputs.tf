output "ecr_app_repository_url" {
  description = "Push the platform image here (tag = commit SHA)."
  value       = aws_ecr_repository.app.repository_url
}

output "ecr_ai_inference_repository_url" {
  description = "Push the ai-inference image here (tag = commit SHA)."
  value       = aws_ecr_repository.ai_inference.repository_url
}

output "ecs_cluster_name" {
  value = aws_ecs_cluster.main.name
}

output "ecs_service_name" {
  value = aws_ecs_service.platform.name
}

output "task_definition_arn" {
  value = aws_ecs_task_definition.platform.arn
}

output "log_group_names" {
  description = "CloudWatch log group of each container."
  value       = { for k, g in aws_cloudwatch_log_group.container : k => g.name }
}

output "secret_arns" {
  description = "Secrets Manager secrets read by the task."
  value = {
    jwt      = aws_secretsmanager_secret.jwt.arn
    database = aws_secretsmanager_secret.database.arn
    mqtt     = aws_secretsmanager_secret.mqtt.arn
  }
}

output "task_security_group_id" {
  value = aws_security_group.task.id
}

output "efs_file_system_id" {
  value = aws_efs_file_system.data.id
}

output "find_task_ip" {
  description = "The task has no load balancer (seed 004 §2.5): this prints its public IP."
  value       = "aws ecs list-tasks --region ${var.aws_region} --cluster ${aws_ecs_cluster.main.name} --service-name ${aws_ecs_service.platform.name} --query 'taskArns[0]' --output text | xargs -I{} aws ecs describe-tasks --region ${var.aws_region} --cluster ${aws_ecs_cluster.main.name} --tasks {} --query \"tasks[0].attachments[0].details[?name=='networkInterfaceId'].value\" --output text | xargs -I{} aws ec2 describe-network-interfaces --region ${var.aws_region} --network-interface-ids {} --query 'NetworkInterfaces[0].Association.PublicIp' --output text"
}
