# Remote state in S3 with S3-native locking (Terraform 1.10+; no DynamoDB table needed).
# Partial configuration: pass the rest at init, so that one file serves every environment:
#   terraform init -backend-config="bucket=my-tf-state" \
#                  -backend-config="key=spot-fleets/llm.tfstate" -backend-config="region=us-east-1"
terraform {
  backend "s3" {
    use_lockfile = true
    encrypt      = true
  }
}
