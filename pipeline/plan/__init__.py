"""Planning: the DAG of stage instances with their content keys, what a recipe cannot build, the stage
cache, memory estimates and what a merge invalidates."""
