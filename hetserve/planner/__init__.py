"""Cost model, device profiles, simulator and planner: pure Python (no torch), so they install and run anywhere."""
