"""Running a plan: each stage instance into the cache, then the records and results a build returns."""
