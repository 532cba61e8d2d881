"""kiln's pipeline: recipe schema, planning, the stage cache, the runner and the `kiln` CLI.

It imports the stages (kiln.quantize, kiln.validate, kiln.compile, kiln.registry, kiln.serve)
through their entry points; no stage imports it. What both sides share lives in kiln.common.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kiln")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
