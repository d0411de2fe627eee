terraform {
  required_version = ">= 1.10.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.60, < 7.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }

  # Remote state in S3 (seed 000 §9.1), configured at init time, e.g.
  #   terraform init -backend-config="bucket=<state bucket>" -backend-config="key=cornjacket/dev.tfstate" \
  #                  -backend-config="region=eu-west-1" -backend-config="use_lockfile=true" -backend-config="encrypt=true"
  # `terraform init -backend=false` is enough for fmt/validate.
  backend "s3" {}
}

provider "aws" {
  region = var.aws_region

  default_tags {
    tags = {
      Project     = "cornjacket"
      Environment = var.environment
      ManagedBy   = "terraform"
    }
  }
}
