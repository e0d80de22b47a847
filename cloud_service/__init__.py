"""splitglm cloud_service agent (the running system arrives with the agents issue)."""
