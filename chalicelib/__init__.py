"""runner-fleet: serverless autoscaling of self-hosted GitLab CI runners on EC2."""
