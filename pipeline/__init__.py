"""kiln's pipeline: the `kiln` CLI (cli/), the recipe (recipe/), planning and the stage cache (plan/), the inputs
stages share (data/), running a plan (run/) and what people read (report/).

It imports the stages (kiln.quantize, kiln.validate, kiln.compile, kiln.registry, kiln.serve)
through their entry points; no stage imports it. What both sides share lives in kiln.common.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kiln")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
