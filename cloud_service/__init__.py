"""splitglm cloud tier: a plan's cloud segment over gRPC, steps of many sessions batched (python -m cloud_service)."""
