"""Planning: profiles, measurements, topologies, the planner, partition and export, the fast-tail choice, live
runs and the report."""
