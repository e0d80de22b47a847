"""splitglm device_agent agent (the running system arrives with the agents issue)."""
