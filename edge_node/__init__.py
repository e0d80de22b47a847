"""splitglm edge_node agent (the running system arrives with the agents issue)."""
