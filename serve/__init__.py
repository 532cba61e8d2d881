"""Serve stage: Triton model repositories and the tritonserver launcher.

Not built yet: arrives with the serve issue. Nothing in kiln calls this package yet.
"""
