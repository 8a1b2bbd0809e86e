//! Azure DevOps REST client: models, authentication, rate limiting, error mapping. Knows nothing of Kubernetes.
