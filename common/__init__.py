"""Utilities every stage and the pipeline share, importing nothing else of kiln.

errors (KilnError and its exit codes), fsutil (atomic writes), digest (sha256 of files, trees and
canonical JSON), progress (bars and plain CI lines on stderr), processes (waiting for a server),
foreign_python (running code in another interpreter), scratch (per-process temporary folders).
"""
