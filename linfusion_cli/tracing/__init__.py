"""Live-bytes traces of the real forward code on the meta device: the check on the planner's estimates."""
