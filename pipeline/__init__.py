"""kiln's pipeline: recipe schema, planning, the stage cache, the runner and the `kiln` CLI.

Shared infrastructure (digests, atomic writes, errors, calibration data) lives
here too; the stages themselves live in kiln.quantize, kiln.validate,
kiln.registry (and, later, kiln.compile and kiln.serve).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kiln")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
