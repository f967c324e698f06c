"""Images: CI image rotation. A push to ECR moves each pool that runs the repository and tag to the new digest,
pinned by digest, gated by its scan, with history, rollback and pinning for operators."""
