# Image repositories (seed 000 §9.1). CI pushes images tagged with the commit SHA; tags are immutable.

resource "aws_ecr_repository" "app" {
  name                 = "${local.name}/app"
  image_tag_mutability = "IMMUTABLE"

  image_scanning_configuration {
    scan_on_push = true
  }
}

# The ai-inference sidecar's image (built from ai-inference/ by CI, same tag as the app by default).
resource "aws_ecr_repository" "ai_inference" {
  name                 = "${local.name}/ai-inference"
  image_tag_mutability = "IMMUTABLE"

  image_scanning_configuration {
    scan_on_push = true
  }
}

locals {
  ecr_lifecycle_policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "Keep the 30 most recent images"
      selection = {
        tagStatus   = "any"
        countType   = "imageCountMoreThan"
        countNumber = 30
      }
      action = { type = "expire" }
    }]
  })
}

resource "aws_ecr_lifecycle_policy" "app" {
  repository = aws_ecr_repository.app.name
  policy     = local.ecr_lifecycle_policy
}

resource "aws_ecr_lifecycle_policy" "ai_inference" {
  repository = aws_ecr_repository.ai_inference.name
  policy     = local.ecr_lifecycle_policy
}
