"""Pure builders that turn a job spec and its planned layout into Kubernetes objects."""
